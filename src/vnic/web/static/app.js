// vnic admin UI: the core. A hash router, the API client, DOM helpers, field errors,
// and an SVG line chart. Pages register themselves (profiles.js, sessions.js).
"use strict";

const vnic = (() => {
  const routes = [];
  let me = null; // {name, role} of the logged-in token

  /** Create an element: el("td", {class: "x", onclick: f}, child, "text", ...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  /** An API error: the response's message and its per-field problems. */
  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.fields = (body && body.fields) || [];
      this.kind = body && body.error;
    }
  }

  /** Call the REST API (the login cookie authenticates); JSON in, JSON out. */
  async function api(method, path, body, {text = false} = {}) {
    const init = {method, headers: {}, credentials: "same-origin"};
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401 && path !== "/ui/login") {
      me = null;
      showLogin("Your session ended: log in again.");
      throw new ApiError(401, {message: "not logged in"});
    }
    if (!r.ok) {
      let data = null;
      try { data = await r.json(); } catch (e) { /* not JSON */ }
      throw new ApiError(r.status, data);
    }
    if (r.status === 204) return null;
    return text ? r.text() : r.json();
  }

  /** Show an API error: next to each named field of `form` (elements with
   *  data-field="path"), the rest in a notice at the top of `where`. */
  function showErrors(where, err) {
    clearErrors(where);
    const loose = [];
    for (const f of err.fields || []) {
      const box = where.querySelector(`[data-field="${CSS.escape(f.field)}"]`);
      const text = `got ${f.value}; expected ${f.expected}`;
      if (box) {
        box.classList.add("invalid");
        box.append(el("div", {class: "field-error", role: "alert"}, text));
      } else {
        loose.push(`${f.field || "(document)"}: ${text}`);
      }
    }
    const head = el("div", {class: "notice error", role: "alert"}, err.message,
      loose.length ? el("ul", {}, loose.map((t) => el("li", {}, t))) : null);
    where.prepend(head);
  }

  function clearErrors(where) {
    where.querySelectorAll(".field-error, .notice.error").forEach((n) => n.remove());
    where.querySelectorAll(".invalid").forEach((n) => n.classList.remove("invalid"));
  }

  function notice(where, text, kind = "ok") {
    where.prepend(el("div", {class: `notice ${kind}`, role: "status"}, text));
  }

  const canEdit = () => me && me.role === "admin";
  const canRunVms = () => me && (me.role === "admin" || me.role === "owner");
  const whoami = () => me;

  /** Register a page: `pattern` a regexp on the hash path, `render(main, ...groups)`. */
  function route(pattern, render) {
    routes.push([pattern, render]);
  }

  let cleanup = [];
  /** Something to undo when the page changes (an EventSource to close, a timer). */
  function onLeave(f) { cleanup.push(f); }

  // Each navigation renders into a view of its own: a page still waiting for the
  // server when the next navigation starts (a slow /profiles, then #/sessions)
  // finishes into its own detached view instead of overwriting the newer page.
  let latest = 0;

  async function render() {
    cleanup.forEach((f) => { try { f(); } catch (e) { /* already gone */ } });
    cleanup = [];
    const main = document.getElementById("main");
    if (!me) return showLogin();
    const path = decodeURIComponent(location.hash.replace(/^#/, "")) || "/profiles";
    document.querySelectorAll("nav a").forEach((a) =>
      a.classList.toggle("active", path.startsWith("/" + a.dataset.nav)));
    for (const [pattern, page] of routes) {
      const m = path.match(pattern);
      if (m) {
        const mine = ++latest;
        const view = el("div", {class: "view"}, el("p", {class: "muted"}, "Loading…"));
        main.replaceChildren(view);
        const started = performance.now();
        try {
          await page(view, ...m.slice(1));
        } catch (err) {
          if (err.status === 401) return;
          view.replaceChildren();
          showErrors(view, err);
        }
        if (mine !== latest) return;  // a newer navigation owns the page now
        // Time from navigation to a rendered page, read by the browser tests.
        document.body.dataset.renderMs = String(Math.round(performance.now() - started));
        document.body.dataset.page = path;
        return;
      }
    }
    latest++;
    main.replaceChildren(el("h1", {}, "Not found"), el("p", {}, `No page at ${path}.`));
  }

  function showLogin(message) {
    document.getElementById("nav").hidden = true;
    document.getElementById("who").replaceChildren();
    const main = document.getElementById("main");
    const form = el("form", {class: "login", id: "login"},
      el("h1", {}, "Log in"),
      el("p", {class: "muted"}, "With an API token: vnic token create NAME --role admin|owner|reader"),
      message ? el("div", {class: "notice error"}, message) : null,
      el("div", {"data-field": "token"},
        el("label", {for: "token"}, "Token"),
        el("input", {id: "token", name: "token", type: "password", autocomplete: "off"})),
      el("button", {class: "primary", type: "submit"}, "Log in"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        me = await api("POST", "/ui/login", {token: form.token.value});
        loggedIn();
      } catch (err) {
        showErrors(form, err);
      }
    });
    main.replaceChildren(form);
  }

  function loggedIn() {
    document.getElementById("nav").hidden = false;
    document.getElementById("who").replaceChildren(
      `${me.name} (${me.role}) `,
      el("button", {id: "logout", onclick: async () => {
        await api("POST", "/ui/logout");
        me = null;
        showLogin();
      }}, "Log out"));
    render();
  }

  async function start() {
    window.addEventListener("hashchange", render);
    try {
      me = await api("GET", "/v1/whoami");
      loggedIn();
    } catch (err) {
      if (err.status !== 401) showLogin(err.message);
    }
  }

  /** An SVG line chart of [t, value] series against an optional limit line.
   *  `series`: [{points: [[t, v], ...], cls: "" | "b", label}]; `limit`: number|null;
   *  `unit`: formats the axis ("bit/s", "s", "packets"). */
  function chart(series, {limit = null, unit = "", span = 60, height = 140} = {}) {
    const W = 360, H = height, L = 46, B = 16;
    const now = Math.max(0, ...series.flatMap((s) => s.points.map((p) => p[0])));
    const values = series.flatMap((s) => s.points.map((p) => p[1]));
    const top = Math.max(1e-9, limit || 0, ...values) * 1.15;
    const x = (t) => L + ((t - (now - span)) / span) * (W - L - 4);
    const y = (v) => (H - B) - (v / top) * (H - B - 6);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("class", "chart");
    const add = (tag, attrs, text) => {
      const n = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
      if (text !== undefined) n.textContent = text;
      svg.append(n);
      return n;
    };
    for (const f of [0, 0.5, 1]) {
      add("text", {x: 2, y: y(top / 1.15 * f) + 3}, human(top / 1.15 * f, unit));
      add("line", {x1: L, x2: W, y1: y(top / 1.15 * f), y2: y(top / 1.15 * f), stroke: "#eee"});
    }
    if (limit) add("line", {class: "limit", x1: L, x2: W, y1: y(limit), y2: y(limit)});
    for (const s of series) {
      const pts = s.points.filter((p) => p[0] >= now - span);
      if (pts.length) {
        add("polyline", {class: `series ${s.cls || ""}`,
          points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")});
      }
    }
    add("text", {x: L, y: H - 2}, `last ${span} s`);
    return svg;
  }

  /** 12500000, "bit/s" -> "12.5 Mbit/s"; 0.0213, "s" -> "21.3 ms". */
  function human(v, unit) {
    if (v === null || v === undefined) return "–";
    if (unit === "s") return v >= 1 ? `${v.toFixed(2)} s` : `${(v * 1000).toFixed(1)} ms`;
    const steps = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [f, p] of steps) {
      if (Math.abs(v) >= f) return `${(v / f).toFixed(1)} ${p}${unit === "bit/s" ? "bit/s" : unit}`;
    }
    return `${Math.round(v)} ${unit}`;
  }

  return {el, api, ApiError, showErrors, clearErrors, notice, route, render, start, chart,
    human, canEdit, canRunVms, whoami, onLeave};
})();
