// Sessions pages: the list, a session (policy, VMs with their effective profile and
// where each field came from, launch / destroy / add / override), its live view
// (server-sent events: rates against the limit, drops by cause, latency against the
// configured delay, audit entries as they come), and the audit log.
"use strict";
(() => {
  const {el, api, human} = vnic;
  const enc = encodeURIComponent;
  const base = (s) => `/v1/sessions/${enc(s)}`;

  /** A ``when`` as local date and time, to the second. */
  const when = (iso) => new Date(iso).toLocaleString(undefined, {hour12: false});

  /** ``{a: 1}`` -> "a: 1", for old/new values of an audit entry. */
  function values(obj) {
    const parts = Object.entries(obj || {}).map(([k, v]) =>
      `${k}: ${v === null ? "unset" : typeof v === "object" ? JSON.stringify(v) : v}`);
    return parts.length ? parts.join(", ") : "–";
  }

  /** One audit entry's changes as "field old → new" lines. */
  function changes(entry) {
    const paths = [...new Set([...Object.keys(entry.old || {}), ...Object.keys(entry.new || {})])];
    if (!paths.length) return "–";
    const show = (v) => (v === null || v === undefined ? "unset"
      : typeof v === "object" ? JSON.stringify(v) : String(v));
    return paths.map((p) => el("div", {class: "change"}, el("code", {}, p), " ",
      el("span", {class: "diff-del"}, show((entry.old || {})[p])), " → ",
      el("span", {class: "diff-add"}, show((entry.new || {})[p]))));
  }

  // ------------------------------------------------------------------ list

  vnic.route(/^\/sessions$/, async (main) => {
    const sessions = await api("GET", "/v1/sessions");
    const rows = sessions.map((s) => el("tr", {"data-session": s.name},
      el("td", {}, el("a", {href: `#/sessions/${enc(s.name)}`}, s.name)),
      el("td", {}, s.network_id),
      el("td", {}, s.default_profile || el("span", {class: "muted"}, "none")),
      el("td", {}, s.rules.length),
      el("td", {}, s.overrides_allowed ? "yes" : "no"),
      el("td", {}, s.owner || el("span", {class: "muted"}, "admins only")),
      el("td", {}, s.vms.length),
      el("td", {}, el("a", {href: `#/sessions/${enc(s.name)}/live`}, "live"))));
    main.replaceChildren(el("h1", {}, "Sessions"),
      sessions.length
        ? el("table", {class: "sessions"},
          el("thead", {}, el("tr", {}, ["Name", "Network", "Default profile", "Rules",
            "Overrides", "Owner", "VMs", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows))
        : el("p", {class: "muted"}, "No sessions yet: vnic session create NAME --default-profile P"));
  });

  // ------------------------------------------------------------------ one session

  function policy(s) {
    const rules = s.rules.map((r, i) => {
      const when = Object.entries(r).filter(([k]) => k !== "profile")
        .map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`);
      return el("li", {"data-rule": i + 1},
        when.length ? when.join(", ") : "every VM", " → ", el("strong", {}, r.profile));
    });
    return el("section", {class: "policy card"},
      el("h2", {}, "Policy"),
      el("dl", {},
        el("dt", {}, "Default profile"),
        el("dd", {"data-policy": "default"}, s.default_profile || "none"),
        el("dt", {}, "Assignment rules (first match wins)"),
        el("dd", {}, rules.length ? el("ol", {}, rules) : el("span", {class: "muted"}, "none")),
        el("dt", {}, "Overrides allowed"),
        el("dd", {"data-policy": "overrides"}, s.overrides_allowed ? "yes" : "no"),
        el("dt", {}, "Owner"), el("dd", {}, s.owner || "admins only"),
        el("dt", {}, "Network id"), el("dd", {}, s.network_id)));
  }

  /** Run an action, then draw the page again (or show the error in `where`). */
  async function act(where, f) {
    where.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      await f();
      await vnic.render();
    } catch (err) {
      where.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      if (err.status !== 401) vnic.showErrors(where, err);
    }
  }

  function addForm(name, profiles) {
    const form = el("form", {class: "add-vm card", id: "add-vm"},
      el("h2", {}, "Add a VM"),
      el("div", {class: "inline"},
        el("label", {"data-field": "name"}, "Name ", el("input", {name: "name", required: true})),
        el("label", {"data-field": "profile"}, "Profile override ",
          el("select", {name: "profile"}, el("option", {value: ""}, "(the policy's)"),
            profiles.map((p) => el("option", {value: p.name}, p.name)))),
        el("label", {"data-field": "driver"}, "Driver ",
          el("select", {name: "driver"}, el("option", {value: "netns"}, "netns"),
            el("option", {value: "qemu"}, "qemu"))),
        el("button", {type: "submit", name: "add", value: "define"}, "Add"),
        el("button", {type: "submit", class: "primary", name: "add", value: "launch"},
          "Add and launch")));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const launch = ev.submitter && ev.submitter.value === "launch";
      const f = form.elements;
      const body = {name: f.name.value.trim(), launch};
      if (f.profile.value) body.profile = f.profile.value;
      if (launch) body.driver = f.driver.value;
      act(form, () => api("POST", `${base(name)}/vms`, body));
    });
    return form;
  }

  /** Override fields the form offers; anything else through the JSON patch box. */
  const OVERRIDE_FIELDS = ["egress.rate", "ingress.rate", "egress.delay", "ingress.delay",
    "egress.loss", "ingress.loss"];

  function overrideForm(name, vm, profiles) {
    const patch = vm.override_patch || {};
    const current = (path) => {
      const [dir, key] = path.split(".");
      const v = (patch[dir] || {})[key];
      return v === undefined || v === null ? "" : String(v);
    };
    const form = el("form", {class: "override", "data-override": vm.name},
      el("div", {class: "inline"},
        el("label", {"data-field": "profile"}, "Profile ",
          el("select", {name: "profile"}, el("option", {value: ""}, "(none: the policy's)"),
            profiles.map((p) => el("option",
              {value: p.name, selected: p.name === vm.override_profile}, p.name))))),
      el("div", {class: "override-fields"}, OVERRIDE_FIELDS.map((path) =>
        el("label", {"data-field": `patch.${path}`}, el("span", {}, path),
          el("input", {name: path, value: current(path), placeholder: "inherit"})))),
      el("p", {class: "muted"}, "Empty: inherit from the policy. \"off\" turns a field off."),
      el("div", {class: "inline"},
        el("button", {type: "submit", class: "primary"}, "Save override"),
        el("button", {type: "button", name: "clear", onclick: () =>
          act(form, () => api("PATCH", `${base(name)}/vms/${enc(vm.name)}`,
            {profile: null, patch: Object.fromEntries(
              Object.keys(patch).map((d) => [d, null]))}))}, "Remove override")));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const body = {profile: form.elements.profile.value || null, patch: {}};
      for (const path of OVERRIDE_FIELDS) {
        const [dir, key] = path.split(".");
        const text = form.elements[path].value.trim();
        const had = current(path) !== "";
        if (!text && !had) continue;
        body.patch[dir] = body.patch[dir] || {};
        body.patch[dir][key] = text || null; // emptied: drop it from the override
      }
      act(form, () => api("PATCH", `${base(name)}/vms/${enc(vm.name)}`, body));
    });
    return form;
  }

  async function explainBox(name, vm, nic = "eth0") {
    const e = await api("GET", `${base(name)}/vms/${enc(vm)}/nics/${enc(nic)}`);
    const rows = Object.entries(e.effective.fields).map(([path, f]) =>
      el("tr", {"data-explain": path, class: f.source.layer === "unset" ? "unset" : null},
        el("td", {}, el("code", {}, path)),
        el("td", {}, f.value === null ? "–" : typeof f.value === "object"
          ? JSON.stringify(f.value) : String(f.value)),
        el("td", {}, el("span", {class: `tag layer-${f.source.layer}`}, f.source.layer)),
        el("td", {class: "muted"}, f.source.detail)));
    return el("div", {},
      el("p", {class: "muted"}, `${vm}/${e.name} on network ${e.network}`),
      el("table", {class: "explain", "data-nic": e.name},
        el("thead", {}, el("tr", {}, ["Field", "Value", "From", "Detail"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows)));
  }

  /** The headline of a vNIC's effective profile: its profile and rate each way. */
  function headline(p) {
    const profile = p.profile ? `${p.profile} r${p.revisions[p.profile]}` : "none";
    const rates = [p.values["egress.rate"], p.values["ingress.rate"]]
      .map((r) => r || "unlimited").join(" / ");
    return {profile, rates};
  }

  /** A row of a VM's further vNIC (eth1...) under the VM's own row, with its explain. */
  function nicRow(name, vm, nic, show) {
    const {profile, rates} = headline(nic);
    return el("tr", {class: "nic-row", "data-of-vm": vm.name, "data-nic": nic.name},
      el("td", {class: "muted"}, "↳"),
      el("td", {}, el("code", {}, nic.name), " ", el("span", {class: "tag"}, nic.network)),
      el("td", {}, ""),
      el("td", {}, el("code", {}, nic.mac || "–")),
      el("td", {}, [nic.ipv4, nic.ipv6].filter(Boolean).join(" ") || "–"),
      el("td", {class: "profile"}, profile),
      el("td", {}, rates),
      el("td", {class: "actions"},
        el("button", {"data-action": "explain", onclick: () => show(`explain:${nic.name}`)},
          "Explain")));
  }

  function vmRow(name, item, profiles, canRun, overridesAllowed) {
    const vm = item.vm;
    const running = vm.state === "running";
    const {profile, rates} = headline(item);
    const nics = item.nics && item.nics.length ? item.nics : [{name: "eth0", network: "default"}];
    const detail = el("tr", {class: "detail", hidden: true},
      el("td", {colspan: 8}));
    const show = async (what) => {
      const cell = detail.firstChild;
      if (!detail.hidden && cell.dataset.what === what) {
        detail.hidden = true;
        return;
      }
      cell.dataset.what = what;
      cell.replaceChildren(what.startsWith("explain")
        ? await explainBox(name, vm.name, what.split(":")[1] || "eth0")
        : overrideForm(name, vm, await profiles()));
      detail.hidden = false;
    };
    const actions = el("td", {class: "actions"},
      el("button", {"data-action": "explain", onclick: () => show("explain")}, "Explain"));
    if (canRun) {
      actions.append(running
        ? el("button", {"data-action": "destroy", class: "danger", onclick: (ev) =>
          act(ev.target.closest("td"), () => api("POST", `${base(name)}/vms/${enc(vm.name)}/destroy`))},
        "Destroy")
        : el("button", {"data-action": "launch", class: "primary", onclick: (ev) =>
          act(ev.target.closest("td"), () => api("POST", `${base(name)}/vms/${enc(vm.name)}/launch`,
            {driver: "netns"}))}, "Launch"));
      if (overridesAllowed) {
        actions.append(el("button", {"data-action": "override", onclick: () => show("override")},
          "Override"));
      }
      actions.append(el("button", {"data-action": "remove", class: "danger", onclick: (ev) => {
        if (confirm(`Remove ${vm.name}${running ? " (it runs: it is stopped first)" : ""}?`)) {
          act(ev.target.closest("td"), () => api("DELETE", `${base(name)}/vms/${enc(vm.name)}`));
        }
      }}, "Remove"));
    }
    const overridden = vm.override_profile || vm.override_patch;
    const row = el("tr", {"data-vm": vm.name, "data-state": vm.state, "data-nic": nics[0].name},
      el("td", {}, vm.name, vm.role ? el("span", {class: "tag"}, vm.role) : null,
        nics.length > 1 ? el("span", {class: "tag"}, `${nics[0].name} ${nics[0].network}`) : null),
      el("td", {class: "state"}, el("span", {class: `state ${vm.state}`}, vm.state)),
      el("td", {}, vm.driver || "–"),
      el("td", {}, el("code", {}, vm.mac || "–")),
      el("td", {}, [vm.ipv4, vm.ipv6].filter(Boolean).join(" ") || "–"),
      el("td", {class: "profile"}, profile, overridden ? el("span", {class: "tag"}, "override") : null),
      el("td", {}, rates),
      actions);
    return [row, ...nics.slice(1).map((n) => nicRow(name, vm, n, show)), detail];
  }

  function networksTable(networks) {
    return el("table", {class: "networks"},
      el("thead", {}, el("tr", {}, ["Network", "Id (VNI)", "IPv4", "IPv6", "Default profile"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, networks.map((n) => el("tr", {"data-network": n.name},
        el("td", {}, n.name), el("td", {}, String(n.network_id)),
        el("td", {}, el("code", {}, n.ipv4)), el("td", {}, el("code", {}, n.ipv6)),
        el("td", {}, n.default_profile || "the session's")))));
  }

  vnic.route(/^\/sessions\/([^/]+)$/, async (main, name) => {
    const [s, vms, networks] = await Promise.all([
      api("GET", base(name)), api("GET", `${base(name)}/vm-profiles`),
      api("GET", `${base(name)}/networks`)]);
    let loaded = null; // the profiles list, fetched when a form first needs it
    const profiles = async () => (loaded = loaded || await api("GET", "/v1/profiles"));
    const canRun = vnic.canRunVms();
    const running = vms.filter((v) => v.vm.state === "running").length;
    const table = el("table", {class: "vms"},
      el("thead", {}, el("tr", {}, ["VM", "State", "Driver", "MAC", "Addresses",
        "Effective profile", "Rate out / in", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, vms.flatMap((v) => vmRow(name, v, profiles, canRun, s.overrides_allowed))));
    main.replaceChildren(
      el("h1", {}, "Session ", el("span", {"data-session": s.name}, s.name)),
      el("div", {class: "toolbar"},
        el("a", {class: "button", href: `#/sessions/${enc(name)}/live`, id: "to-live"}, "Live view"),
        el("a", {class: "button", href: `#/audit?session=${enc(name)}`}, "Audit log"),
        el("span", {class: "muted"}, `${vms.length} VMs, ${running} running`)),
      policy(s),
      el("h2", {}, "Networks"),
      networksTable(networks),
      el("h2", {}, "VMs (a row per vNIC)"),
      vms.length ? table : el("p", {class: "muted"}, "No VMs yet."));
    if (canRun) main.append(addForm(name, await profiles()));
  });

  // ------------------------------------------------------------------ live view

  const CAUSES = ["rate_limit", "queue_overflow", "emulated_loss", "anti_spoofing"];
  const SPAN = 60; // seconds of history in the charts

  /** One vNIC's card: charts and latest values, updated by `push(sample, t)`. */
  function liveCard(vm, configured, nic = "eth0", network = "default") {
    const hist = {egress: [], ingress: [], latency: [], drops: []};
    let prevDrops = null;
    let prevT = null;
    const charts = {rate: el("div", {}), drops: el("div", {}), latency: el("div", {})};
    const text = {
      egress: el("span", {class: "value", "data-value": "egress"}, "–"),
      ingress: el("span", {class: "value", "data-value": "ingress"}, "–"),
      latency: el("span", {class: "value", "data-value": "latency"}, "–"),
      drops: el("span", {class: "value", "data-value": "drops"}, "–"),
    };
    const nums = configured ? configured.numbers : {};
    const delay = (nums["egress.delay"] || 0) + (nums["ingress.delay"] || 0);
    const card = el("section", {class: "card live-card", "data-vm": vm, "data-nic": nic},
      el("h3", {}, `${vm}/${nic}`, el("span", {class: "tag"}, network),
        configured && configured.profile
        ? el("span", {class: "tag"}, configured.profile) : null),
      el("div", {class: "readings"},
        el("div", {}, "out ", text.egress), el("div", {}, "in ", text.ingress),
        el("div", {}, "latency ", text.latency), el("div", {}, "drops/s ", text.drops)),
      el("h4", {}, "Rate (out: blue, in: purple; dashed: the profile's limit)"), charts.rate,
      el("h4", {}, "Drops per second by cause"), charts.drops,
      el("h4", {}, `Latency (dashed: configured delay ${delay ? human(delay, "s") : "none"})`),
      charts.latency);

    function push(sample, t) {
      const e = sample.egress, i = sample.ingress;
      hist.egress.push([t, e.rate_bps || 0]);
      hist.ingress.push([t, i.rate_bps || 0]);
      if (sample.latency_seconds !== null && sample.latency_seconds !== undefined) {
        hist.latency.push([t, sample.latency_seconds]);
      }
      const drops = {};
      for (const c of new Set([...Object.keys(e.drops), ...Object.keys(i.drops)])) {
        drops[c] = (e.drops[c] || 0) + (i.drops[c] || 0);
      }
      let perSecond = {};
      if (prevDrops && t > prevT) {
        for (const c of Object.keys(drops)) {
          perSecond[c] = Math.max(0, (drops[c] - (prevDrops[c] || 0)) / (t - prevT));
        }
        hist.drops.push([t, perSecond]);
      }
      prevDrops = drops;
      prevT = t;
      for (const k of Object.keys(hist)) {
        while (hist[k].length && hist[k][0][0] < t - SPAN) hist[k].shift();
      }
      const limit = Math.max(e.profile_rate_bps || 0, i.profile_rate_bps || 0) || null;
      charts.rate.replaceChildren(vnic.chart([
        {points: hist.egress, label: "out"}, {points: hist.ingress, cls: "b", label: "in"}],
      {limit, unit: "bit/s", span: SPAN}));
      const causes = [...new Set(hist.drops.flatMap(([, d]) => Object.keys(d)))];
      charts.drops.replaceChildren(vnic.chart(causes.map((c, n) => ({
        points: hist.drops.map(([tt, d]) => [tt, d[c] || 0]),
        cls: `c${CAUSES.indexOf(c) >= 0 ? CAUSES.indexOf(c) : n}`, label: c})),
      {unit: "/s", span: SPAN}));
      charts.latency.replaceChildren(vnic.chart([{points: hist.latency, label: "rtt"}],
        {limit: delay || null, unit: "s", span: SPAN}));
      text.egress.textContent = `${human(e.rate_bps, "bit/s")} of ${
        e.profile_rate_bps ? human(e.profile_rate_bps, "bit/s") : "unlimited"}`;
      text.ingress.textContent = `${human(i.rate_bps, "bit/s")} of ${
        i.profile_rate_bps ? human(i.profile_rate_bps, "bit/s") : "unlimited"}`;
      text.latency.textContent = human(sample.latency_seconds, "s");
      const total = Object.values(perSecond).reduce((a, b) => a + b, 0);
      text.drops.textContent = Object.entries(perSecond).filter(([, v]) => v > 0)
        .map(([c, v]) => `${c} ${v.toFixed(1)}`).join(", ") || "0";
      Object.assign(card.dataset, {
        egressBps: String(e.rate_bps ?? ""),
        ingressBps: String(i.rate_bps ?? ""),
        egressLimitBps: String(e.profile_rate_bps ?? ""),
        ingressLimitBps: String(i.profile_rate_bps ?? ""),
        latencyS: String(sample.latency_seconds ?? ""),
        configuredDelayS: String(delay),
        dropsPerS: String(total),
        samples: String(hist.egress.length),
      });
    }
    return {card, push};
  }

  function auditRow(a) {
    return el("tr", {"data-audit": a.id},
      el("td", {}, when(a.at)), el("td", {}, a.session), el("td", {}, a.vm),
      el("td", {}, el("span", {class: "tag"}, a.source)), el("td", {}, a.reason),
      el("td", {}, changes(a)));
  }

  function auditTable(entries, withSession = true) {
    const heads = ["When", "Session", "VM", "Source", "Reason", "Old → new"];
    const body = el("tbody", {}, entries.map(auditRow));
    const table = el("table", {class: "audit"},
      el("thead", {}, el("tr", {}, heads.map((h) => el("th", {}, h)))), body);
    if (!withSession) table.classList.add("no-session");
    return {table, body};
  }

  vnic.route(/^\/sessions\/([^/]+)\/live$/, async (main, name) => {
    // The configured rate and delay of each VM (refetched when an unknown VM starts).
    // Keyed "vm/nic": a card per vNIC.
    let configured = {};
    const configure = async () => {
      configured = Object.fromEntries((await api("GET", `${base(name)}/vm-profiles`))
        .flatMap((v) => (v.nics && v.nics.length ? v.nics : [{...v, name: "eth0"}])
          .map((n) => [`${v.vm.name}/${n.name}`, {...n, vm: v.vm.name}])));
    };
    await configure();
    const grid = el("div", {class: "charts", id: "live-cards"});
    const status = el("span", {class: "muted", id: "live-status"}, "connecting…");
    const empty = el("p", {class: "muted"}, "No VM of this session runs yet.");
    const {table, body} = auditTable([], false);
    main.replaceChildren(
      el("h1", {}, "Live: ", el("a", {href: `#/sessions/${enc(name)}`}, name)),
      el("div", {class: "toolbar"}, status), empty, grid,
      el("h2", {}, "Changes as they happen (adjustments, controller rules, feedback)"), table);
    const cards = new Map();
    let events = 0;
    const source = new EventSource(`${base(name)}/live`);
    vnic.onLeave(() => source.close());
    source.onerror = () => { status.textContent = "reconnecting…"; };
    source.onmessage = async (msg) => {
      const event = JSON.parse(msg.data);
      events += 1;
      status.textContent = `updated ${new Date(event.t * 1000).toLocaleTimeString(undefined,
        {hour12: false})} (${event.vnics.length} running)`;
      main.dataset.events = String(events);
      const seen = new Set();
      // One document per VM; its vNICs under nics (an agent of the previous release: none).
      const samples = event.vnics.flatMap((doc) => doc.nics && doc.nics.length
        ? doc.nics : [{...doc, nic: "eth0"}]);
      for (const sample of samples) {
        const key = `${sample.vm}/${sample.nic || "eth0"}`;
        seen.add(key);
        let c = cards.get(key);
        if (!c) {
          if (!configured[key]) await configure().catch(() => null);
          if (cards.has(key)) c = cards.get(key); // drawn while we waited
        }
        if (!c) {
          c = liveCard(sample.vm, configured[key], sample.nic || "eth0", sample.network);
          cards.set(key, c);
          grid.append(c.card);
        }
        c.push(sample, event.t);
      }
      for (const [vm, c] of cards) c.card.classList.toggle("stopped", !seen.has(vm));
      empty.hidden = cards.size > 0;
      for (const a of event.audit) body.prepend(auditRow(a)); // oldest first: newest on top
    };
  });

  // ------------------------------------------------------------------ audit log

  vnic.route(/^\/audit(?:\?(.*))?$/, async (main, query) => {
    const params = new URLSearchParams(query || "");
    const q = new URLSearchParams({limit: params.get("limit") || "200"});
    for (const k of ["session", "vm"]) if (params.get(k)) q.set(k, params.get(k));
    const entries = await api("GET", `/v1/audit?${q}`);
    const form = el("form", {class: "toolbar", id: "audit-filter"},
      el("label", {}, "Session ", el("input", {name: "session", value: params.get("session") || ""})),
      el("label", {}, "VM ", el("input", {name: "vm", value: params.get("vm") || ""})),
      el("button", {type: "submit"}, "Filter"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const next = new URLSearchParams();
      for (const k of ["session", "vm"]) {
        const v = form.elements[k].value.trim();
        if (v) next.set(k, v);
      }
      location.hash = `#/audit${next.toString() ? "?" + next : ""}`;
    });
    main.replaceChildren(el("h1", {}, "Audit log"),
      el("p", {class: "muted"}, "Runtime changes, newest first: adjustments by hand, " +
        "controller rules, feedback and scenarios."),
      form,
      entries.length ? auditTable(entries).table : el("p", {class: "muted"}, "Nothing yet."));
  });
})();
