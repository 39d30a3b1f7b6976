// Hosts page: the hypervisor hosts whose agents dial out to this manager (docs/hosts.md):
// state (new / ready / unknown), epoch, lease, capacity used, labels; admins cordon,
// uncordon and drain (the answer says where each VM went).
"use strict";
(() => {
  const {el, api} = vnic;
  const enc = encodeURIComponent;

  function row(h, main) {
    const state = el("span", {class: `tag state-${h.state}`}, h.state);
    const actions = vnic.canEdit() ? el("td", {class: "actions"},
      el("button", {type: "button", "data-action": h.cordoned ? "uncordon" : "cordon",
        onclick: () => act(main, h.name, h.cordoned ? "uncordon" : "cordon")},
        h.cordoned ? "Uncordon" : "Cordon"),
      el("button", {type: "button", "data-action": "drain",
        onclick: () => act(main, h.name, "drain")}, "Drain")) : null;
    return el("tr", {"data-host": h.name, "data-state": h.state,
      "data-cordoned": h.cordoned ? "yes" : "no"},
      el("td", {}, h.name),
      el("td", {}, state, h.cordoned ? el("span", {class: "tag"}, "cordoned") : null),
      el("td", {}, h.underlay || el("span", {class: "muted"}, "–")),
      el("td", {}, h.epoch),
      el("td", {}, h.lease_until ? new Date(h.lease_until).toLocaleTimeString(undefined, {hour12: false})
        : el("span", {class: "muted"}, "–")),
      el("td", {}, h.vms),
      el("td", {}, `${h.vnics_used} / ${h.capacity.vnics}`),
      el("td", {}, h.capacity.cpus),
      el("td", {}, Object.entries(h.labels).map(([k, v]) => el("span", {class: "tag"}, `${k}=${v}`))),
      actions);
  }

  async function act(main, name, action) {
    try {
      const answer = await api("POST", `/v1/hosts/${enc(name)}/${action}`);
      await render(main);
      if (action === "drain") {
        const moves = answer.moves.map((m) => m.to && !m.error
          ? `${m.session}/${m.vm} → ${m.to}` : `${m.session}/${m.vm} stayed (${m.error})`);
        vnic.notice(main, `host ${name} drained: ${moves.length ? moves.join("; ") : "no VMs ran there"}`);
      } else {
        vnic.notice(main, `host ${name}: ${action === "cordon" ? "cordoned" : "uncordoned"}`);
      }
    } catch (err) {
      vnic.showErrors(main, err);
    }
  }

  async function render(main) {
    const hosts = await api("GET", "/v1/hosts");
    main.replaceChildren(el("h1", {}, "Hosts"),
      hosts.length
        ? el("table", {class: "hosts"},
          el("thead", {}, el("tr", {}, ["Host", "State", "Underlay", "Epoch", "Lease until",
            "VMs", "vNICs used", "CPUs", "Labels", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, hosts.map((h) => row(h, main))))
        : el("p", {class: "muted"},
          "No hosts: every VM runs on this manager's own agent. Add one with vnic host add NAME."));
  }

  vnic.route(/^\/hosts$/, render);
})();
