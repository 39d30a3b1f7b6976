// Sessions pages (policy, VMs and provenance, live view) and the audit log.
"use strict";
vnic.route(/^\/sessions$/, async (main) => {
  const sessions = await vnic.api("GET", "/v1/sessions");
  main.replaceChildren(vnic.el("h1", {}, "Sessions"),
    vnic.el("ul", {}, sessions.map((s) => vnic.el("li", {}, s.name))));
});
