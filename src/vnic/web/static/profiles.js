// Profiles pages (list, editor, history, usage, import/export).
"use strict";
vnic.route(/^\/profiles$/, async (main) => {
  const profiles = await vnic.api("GET", "/v1/profiles");
  main.replaceChildren(vnic.el("h1", {}, "Profiles"),
    vnic.el("ul", {}, profiles.map((p) => vnic.el("li", {}, p.name))));
});
