// Profiles pages: the list (search, new, import, export), a profile (document, editor,
// users, delete) with its revision history and a diff of two revisions, the new-profile
// form and the YAML import. Every change goes through the REST API, which validates it
// with the same code as the CLI; its field errors land next to the field's row.
"use strict";

(() => {
  const {el, api} = vnic;
  // Fields edited as JSON in a text area (lists of QoS classes); the rest are one-line
  // inputs, where a value starting with { or [ is read as JSON too (egress.loss as
  // {"mean": "2%", "burst_length": 4}) and anything else is sent as the text typed.
  const TEXTAREA = new Set(["qos.egress", "qos.ingress"]);
  // #/profiles/new and #/profiles/import are pages; profiles of those names (valid
  // names) are reached at #/profile/NAME, which works for every profile.
  const href = (name) =>
    `#/${["new", "import"].includes(name) ? "profile" : "profiles"}/${encodeURIComponent(name)}`;
  const exportHref = (name) =>
    "/v1/export/profiles.yaml" + (name ? `?name=${encodeURIComponent(name)}` : "");

  let fieldsCache = null;
  async function catalogue() {
    if (!fieldsCache) fieldsCache = await api("GET", "/v1/profile-fields");
    return fieldsCache;
  }

  function get(doc, path) {
    let v = doc;
    for (const part of path.split(".")) {
      if (v === null || typeof v !== "object") return undefined;
      v = v[part];
    }
    return v;
  }

  function put(doc, path, value) {
    const parts = path.split(".");
    let o = doc;
    for (const part of parts.slice(0, -1)) o = o[part] = o[part] || {};
    o[parts[parts.length - 1]] = value;
  }

  /** A document value as the text a user types ("10Mbit", "true", JSON for objects). */
  function show(v) {
    if (v === undefined || v === null) return "";
    return typeof v === "string" ? v : JSON.stringify(v);
  }

  /** The text of an input as a document value: "" removes, {...} / [...] is JSON. */
  function read(path, text) {
    const t = text.trim();
    if (!t) return null;
    if (!/^[{[]/.test(t)) return t;
    try {
      return JSON.parse(t);
    } catch (e) {
      throw new vnic.ApiError(422, {message: `${path}: not valid JSON`,
        fields: [{field: path, value: t, expected: `JSON (${e.message})`}]});
    }
  }

  const labelsText = (labels) => Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");

  function readLabels(text) {
    const out = {};
    for (const item of text.split(",").map((s) => s.trim()).filter(Boolean)) {
      const [k, ...rest] = item.split("=");
      if (!rest.length || !k.trim()) {
        throw new vnic.ApiError(422, {message: "labels: KEY=VALUE, separated by commas",
          fields: [{field: "labels", value: item, expected: "KEY=VALUE, e.g. site=lab, kind=wan"}]});
      }
      out[k.trim()] = rest.join("=").trim();
    }
    return out;
  }

  /** A document as "path: value" lines (labels.KEY, egress.rate, ...), name left out. */
  function flatten(doc, known) {
    const out = {};
    const walk = (o, prefix) => {
      for (const [k, v] of Object.entries(o || {})) {
        const p = prefix ? `${prefix}.${k}` : k;
        if (p === "name") continue;
        if (v && typeof v === "object" && !Array.isArray(v) && !known.has(p)) walk(v, p);
        else out[p] = show(v);
      }
    };
    walk(doc, "");
    return out;
  }

  function diff(a, b, known) {
    const fa = flatten(a, known), fb = flatten(b, known);
    const keys = [...new Set([...Object.keys(fa), ...Object.keys(fb)])].sort();
    return keys.filter((k) => fa[k] !== fb[k]).map((k) => ({field: k, old: fa[k], new: fb[k]}));
  }

  // ------------------------------------------------------------------ list

  vnic.route(/^\/profiles$/, async (main) => {
    const profiles = await api("GET", "/v1/profiles");
    const search = el("input", {type: "search", id: "profile-search",
      placeholder: "Filter by name or label", "aria-label": "Filter profiles"});
    const rows = profiles.map((p) => {
      const labels = Object.entries(p.labels).map(([k, v]) => `${k}=${v}`);
      const tr = el("tr", {dataset: {profile: p.name}},
        el("td", {}, el("a", {href: href(p.name)}, p.name)),
        el("td", {}, p.description),
        el("td", {}, labels.map((l) => el("span", {class: "tag"}, l))),
        el("td", {class: "rev"}, `r${p.revision}`),
        el("td", {class: "muted"}, p.used_by.length ? `${p.used_by.length}` : "–"));
      return [tr, `${p.name} ${labels.join(" ")}`.toLowerCase()];
    });
    const count = el("span", {class: "muted", id: "profile-count"}, `${profiles.length} profiles`);
    search.addEventListener("input", () => {
      const q = search.value.trim().toLowerCase();
      let shown = 0;
      for (const [tr, key] of rows) {
        tr.hidden = !!q && !key.includes(q);
        if (!tr.hidden) shown++;
      }
      count.textContent = q ? `${shown} of ${profiles.length} profiles` : `${profiles.length} profiles`;
    });
    main.replaceChildren(
      el("h1", {}, "Profiles"),
      el("div", {class: "toolbar"}, search, count,
        el("span", {class: "spacer"}),
        vnic.canEdit() ? el("a", {class: "button", id: "new-profile", href: "#/profiles/new"}, "New profile") : null,
        vnic.canEdit() ? el("a", {class: "button", id: "import-profiles", href: "#/profiles/import"}, "Import YAML") : null,
        el("a", {class: "button", href: exportHref(), download: "profiles.yaml"}, "Export YAML")),
      profiles.length
        ? el("table", {class: "profiles", id: "profiles"},
          el("thead", {}, el("tr", {}, ["name", "description", "labels", "revision", "used by"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows.map(([tr]) => tr)))
        : el("p", {class: "muted"}, "No profiles yet."));
  });

  // ------------------------------------------------------------------ editor form

  /** The editor: one row per field (unit, default, hint; current value prefilled).
   *  Returns {form, values()} where values() gives [path, text, initialText] triples. */
  function editorForm(fields, doc, {isNew}) {
    const inputs = [];
    const row = (path, label, input, hint) => {
      inputs.push([path, input, input.value]);
      return el("div", {class: "field", dataset: {field: path}},
        el("label", {for: input.id}, label), input, el("div", {class: "hint"}, hint));
    };
    const text = (path, value, attrs = {}) =>
      el("input", {id: `f-${path}`, name: path, type: "text", value: value, autocomplete: "off", ...attrs});
    const meta = el("fieldset", {class: "group"}, el("legend", {}, "Profile"),
      isNew ? row("name", "name", text("name", "", {required: true}), "Lower-case letters, digits and -; cannot change later.") : null,
      row("description", "description", text("description", doc.description || ""), "Free text, at most 1000 characters."),
      row("labels", "labels", text("labels", labelsText(doc.labels)), "KEY=VALUE, separated by commas (what session rules match on)."));
    const groups = new Map();
    for (const f of fields) {
      const group = f.field.includes(".") ? f.field.split(".")[0] : "general";
      if (!groups.has(group)) groups.set(group, el("fieldset", {class: "group"}, el("legend", {}, group)));
      const current = show(get(doc, f.field));
      const input = TEXTAREA.has(f.field)
        ? el("textarea", {id: `f-${f.field}`, name: f.field, rows: 3, placeholder: "JSON list of classes, or off"}, current)
        : text(f.field, current, {placeholder: f.unit ? `unset · ${f.unit}` : "unset"});
      if (TEXTAREA.has(f.field)) input.value = current;
      groups.get(group).append(row(f.field,
        [el("code", {}, f.field), f.unit ? el("span", {class: "unit"}, f.unit) : null],
        input,
        [f.doc.replace(`Default: ${f.default}.`, "").trim(), el("br"),
          el("span", {class: "default"}, `Default: ${f.default}. `),
          el("span", {class: "expected"}, `Expects ${f.expected}.`)]));
    }
    const form = el("form", {class: "editor", id: "profile-editor", novalidate: true}, meta, ...groups.values(),
      el("div", {class: "toolbar"},
        el("button", {class: "primary", type: "submit", id: "save"}, isNew ? "Create profile" : "Save"),
        el("span", {class: "muted"}, isNew ? "" : "Empty a field to remove its value; \"off\" turns it off over a lower layer.")));
    return {form, inputs};
  }

  /** The PATCH body: changed fields only, nested; null removes. */
  function patchFrom(inputs, doc) {
    const patch = {};
    for (const [path, input, initial] of inputs) {
      if (input.value === initial) continue;
      if (path === "description") patch.description = input.value.trim() || null;
      else if (path === "labels") {
        const next = readLabels(input.value), before = doc.labels || {};
        const labels = {};
        for (const k of Object.keys(before)) if (!(k in next)) labels[k] = null;
        for (const [k, v] of Object.entries(next)) if (before[k] !== v) labels[k] = v;
        if (Object.keys(labels).length) patch.labels = labels;
      } else put(patch, path, read(path, input.value));
    }
    return patch;
  }

  /** The POST body: every filled-in field. */
  function documentFrom(inputs) {
    const doc = {};
    for (const [path, input] of inputs) {
      if (path === "labels") {
        const labels = readLabels(input.value);
        if (Object.keys(labels).length) doc.labels = labels;
      } else if (path === "name" || path === "description") {
        if (input.value.trim()) doc[path] = input.value.trim();
      } else {
        const v = read(path, input.value);
        if (v !== null) put(doc, path, v);
      }
    }
    return doc;
  }

  // ------------------------------------------------------------------ new, import

  vnic.route(/^\/profiles\/new$/, async (main) => {
    if (!vnic.canEdit()) {
      main.replaceChildren(el("h1", {}, "New profile"), el("p", {class: "notice error"}, "Creating a profile needs the admin role."));
      return;
    }
    const {form, inputs} = editorForm(await catalogue(), {}, {isNew: true});
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const created = await api("POST", "/v1/profiles", documentFrom(inputs));
        location.hash = href(created.name);
      } catch (err) {
        if (err.status !== 401) vnic.showErrors(form, err);
      }
    });
    main.replaceChildren(el("p", {}, el("a", {href: "#/profiles"}, "← Profiles")),
      el("h1", {}, "New profile"), form);
  });

  vnic.route(/^\/profiles\/import$/, async (main) => {
    const area = el("textarea", {id: "import-text", rows: 14, spellcheck: "false",
      placeholder: "name: wan\negress: {rate: 10Mbit, delay: 20ms}\n---\nname: lan\negress: {rate: 1Gbit}"});
    const file = el("input", {type: "file", id: "import-file", accept: ".yaml,.yml,.json"});
    file.addEventListener("change", async () => { if (file.files[0]) area.value = await file.files[0].text(); });
    const result = el("div", {id: "import-result"});
    const form = el("form", {class: "import", id: "import-form"},
      el("p", {class: "muted"}, "One profile, a list, or several YAML documents separated by ---, as for vnic profile apply -f. All or nothing: nothing is stored if one profile is wrong; unchanged profiles keep their revision."),
      el("div", {class: "toolbar"}, el("label", {for: "import-file"}, "From a file: "), file),
      el("div", {"data-field": "file"}, area),
      el("div", {class: "toolbar"}, el("button", {class: "primary", type: "submit", id: "import"}, "Import")),
      result);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      vnic.clearErrors(form);
      result.replaceChildren();
      const r = await fetch("/v1/import/profiles/yaml", {method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/yaml"}, body: area.value});
      const body = await r.json().catch(() => null);
      if (!r.ok) return vnic.showErrors(form, new vnic.ApiError(r.status, body));
      result.append(el("table", {},
        el("thead", {}, el("tr", {}, el("th", {}, "profile"), el("th", {}, "action"), el("th", {}, "revision"), el("th", {}, "running VMs changed"))),
        el("tbody", {}, body.map((p) => el("tr", {},
          el("td", {}, el("a", {href: href(p.name)}, p.name)), el("td", {}, p.action),
          el("td", {}, `r${p.revision}`), el("td", {}, String(p.changes.length)))))));
    });
    main.replaceChildren(el("p", {}, el("a", {href: "#/profiles"}, "← Profiles")),
      el("h1", {}, "Import profiles"),
      vnic.canEdit() ? form : el("p", {class: "notice error"}, "Importing profiles needs the admin role."));
  });

  // ------------------------------------------------------------------ one profile

  function usersList(users) {
    if (!users.length) return el("p", {class: "muted", id: "used-by"}, "Not used by any session or VM.");
    return el("ul", {id: "used-by"}, users.map((u) => {
      const m = u.match(/^(session|vm) ([^/ ]+)/);
      return el("li", {}, m ? el("a", {href: `#/sessions/${encodeURIComponent(m[2])}`}, u) : u);
    }));
  }

  function historySection(revisions, known) {
    const nums = revisions.map((r) => r.revision);
    const byRev = new Map(revisions.map((r) => [r.revision, r]));
    const pick = (id, chosen) => el("select", {id},
      nums.map((n) => el("option", {value: n, selected: n === chosen}, `r${n} · ${new Date(byRev.get(n).created_at).toLocaleString()}`)));
    const last = nums[nums.length - 1];
    const from = pick("diff-from", nums.length > 1 ? nums[nums.length - 2] : last);
    const to = pick("diff-to", last);
    const out = el("div", {id: "diff"});
    const update = () => {
      const a = byRev.get(Number(from.value)).document, b = byRev.get(Number(to.value)).document;
      const lines = diff(a, b, known);
      out.replaceChildren(lines.length
        ? el("ul", {class: "diff"}, lines.map((d) => el("li", {dataset: {field: d.field}},
          el("code", {}, d.field), ": ",
          el("span", {class: d.old ? "diff-del" : "unset"}, d.old || "(unset)"), " → ",
          el("span", {class: d.new ? "diff-add" : "unset"}, d.new || "(unset)"))))
        : el("p", {class: "muted"}, from.value === to.value ? "Pick two different revisions." : "No difference."));
    };
    from.addEventListener("change", update);
    to.addEventListener("change", update);
    update();
    // Newest first: when, and which fields changed from the revision before.
    const table = el("table", {class: "revisions", id: "revisions"},
      el("thead", {}, el("tr", {}, el("th", {}, "revision"), el("th", {}, "created"), el("th", {}, "changed fields"))),
      el("tbody", {}, [...revisions].reverse().map((r, i, all) => {
        const before = all[i + 1];
        const changed = before ? diff(before.document, r.document, known).map((d) => d.field) : [];
        const show = before ? el("a", {href: "", onclick: (ev) => {
          ev.preventDefault();
          from.value = String(before.revision);
          to.value = String(r.revision);
          update();
        }}, changed.length ? changed.join(", ") : "(no field changed)") : el("span", {class: "muted"}, "created");
        return el("tr", {dataset: {revision: r.revision}}, el("td", {class: "rev"}, `r${r.revision}`),
          el("td", {}, new Date(r.created_at).toLocaleString()), el("td", {}, show));
      })));
    return el("section", {id: "history"}, el("h2", {}, `History (${nums.length} revision${nums.length > 1 ? "s" : ""})`),
      el("div", {class: "toolbar"}, "Changes from ", from, " to ", to), out, table);
  }

  async function renderProfile(main, name, flash) {
    const [p, revisions, yaml, fields] = await Promise.all([
      api("GET", `/v1/profiles/${encodeURIComponent(name)}`),
      api("GET", `/v1/profiles/${encodeURIComponent(name)}/revisions`),
      api("GET", exportHref(name), undefined, {text: true}),
      catalogue()]);
    const known = new Set(fields.map((f) => f.field));
    const actions = el("div", {class: "toolbar", id: "profile-actions"},
      el("a", {class: "button", href: exportHref(name), download: `${name}.yaml`, id: "export"}, "Export YAML"));
    if (vnic.canEdit()) {
      actions.append(el("button", {class: "danger", id: "delete", onclick: async () => {
        if (!confirm(`Delete profile ${name} and all its revisions?`)) return;
        try {
          await api("DELETE", `/v1/profiles/${encodeURIComponent(name)}`);
          location.hash = "#/profiles";
        } catch (err) {
          if (err.status !== 401) vnic.showErrors(actions, err);
        }
      }}, "Delete"));
    }
    const parts = [
      el("p", {}, el("a", {href: "#/profiles"}, "← Profiles")),
      el("h1", {}, p.name, " ", el("span", {class: "rev"}, `revision ${p.revision}`)),
      p.description ? el("p", {}, p.description) : null,
      el("p", {}, Object.entries(p.labels).map(([k, v]) => el("span", {class: "tag"}, `${k}=${v}`))),
      actions,
      el("div", {class: "profile-cols"},
        el("section", {}, el("h2", {}, "Current document"), el("pre", {class: "document", id: "document"}, yaml)),
        el("section", {}, el("h2", {}, "Used by"), usersList(p.used_by))),
    ];
    if (vnic.canEdit()) {
      const {form, inputs} = editorForm(fields, p.document, {isNew: false});
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        vnic.clearErrors(form);
        try {
          const patch = patchFrom(inputs, p.document);
          if (!Object.keys(patch).length) return vnic.notice(form, "Nothing changed.", "ok");
          const saved = await api("PATCH", `/v1/profiles/${encodeURIComponent(name)}`, patch);
          const live = saved.changes.length ? `; ${saved.changes.length} running VM(s) changed live` : "";
          await renderProfile(main, name, saved.revision === p.revision
            ? "Saved: no change, the revision stays." : `Saved as revision ${saved.revision}${live}.`);
        } catch (err) {
          if (err.status !== 401) vnic.showErrors(form, err);
        }
      });
      parts.push(historySection(revisions, known), el("section", {id: "edit"}, el("h2", {}, "Edit"), form));
    } else {
      parts.push(historySection(revisions, known));
    }
    main.replaceChildren(...parts);
    if (flash) vnic.notice(main, flash, "ok");
  }

  vnic.route(/^\/profiles?\/([^/]+)$/, (main, name) => renderProfile(main, name));
})();
