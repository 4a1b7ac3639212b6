// The commissioning page: one EventSource on /api/live. "snapshot" carries the state and
// the last taps, "status" the state every second, "tap" each tap as it is decided.
// Everything from the gateway is shown through textContent, never as HTML.
"use strict";

const MAX_TAPS = 20;

const REASONS = {
  blocked: "card blocked (Kortet är spärrat)",
  terminated: "card terminated (Kortet är avslutat)",
  suspended: "card suspended (Kortet är avstängt)",
  not_activated: "card not activated (Kortet är inte aktiverat)",
  blocklist_stale: "blocklist too old (Spärrlistan är för gammal)",
  site_banned: "banned from this site (Spärrad på arbetsplatsen)",
  not_on_site_list: "not on the site list (Inte anmäld på arbetsplatsen)",
};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 60) return seconds + " s ago";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
  if (seconds < 172800) return Math.floor(seconds / 3600) + " h ago";
  return Math.floor(seconds / 86400) + " days ago";
}

function tile(label, value, cls) {
  const t = el("div", null, "tile");
  t.appendChild(el("div", label, "label"));
  t.appendChild(el("div", value, "value " + (cls || "")));
  return t;
}

function showStatus(s) {
  const g = s.gateway;
  document.getElementById("title").textContent = s.site_id + " / " + s.terminal_id;
  document.getElementById("subtitle").textContent =
    "id06d " + g.version + " · stream " + g.stream + " · last seq " + g.last_seq;
  const tiles = document.getElementById("tiles");
  tiles.replaceChildren(
    tile("Broker", s.broker_connected ? "connected" : "away", s.broker_connected ? "ok" : "bad"),
    tile("Outbox", g.outbox_depth === 0 ? "empty" :
      g.outbox_depth + " waiting" + (s.oldest_waiting_s !== null ? ", oldest " + s.oldest_waiting_s + " s" : ""),
      g.outbox_depth === 0 ? "ok" : "warn"),
    s.ledger_confirm
      ? tile("Ledger", "confirmed to seq " + g.ledger_confirmed_seq + (g.ledger_unconfirmed ? ", " + g.ledger_unconfirmed + " not yet" : ""),
          g.ledger_unconfirmed ? "warn" : "ok")
      : tile("Ledger", "not asked to confirm", ""),
    tile("Blocklist", "v" + s.blocklist.version + " · " + s.blocklist.cards + " cards · " + age(s.blocklist.age_s),
      s.blocklist.stale ? "bad" : "ok"),
    tile("Site list", "v" + s.site_list.version + " · " + s.site_list.banned + " banned · " +
      s.site_list.allowed + " allowed (" + s.site_list.mode + ")", ""),
    tile("Clock", g.clock_synced ? "synchronised" : "NOT synchronised", g.clock_synced ? "ok" : "bad"),
    tile("Storage", g.storage_error ? g.storage_error : "ok", g.storage_error ? "bad" : "ok"),
    tile("Since start", s.counts.taps + " taps · " + s.counts.granted + " granted · " + s.counts.denied + " denied", ""),
  );
  const readers = document.getElementById("readers");
  if (s.readers.length === 0) {
    readers.replaceChildren(el("tr"));
    readers.firstChild.appendChild(el("td", "No reader configured.", "empty"));
    return;
  }
  readers.replaceChildren(...s.readers.map((r) => {
    const tr = el("tr");
    tr.dataset.reader = r.name;
    tr.appendChild(el("td", r.name));
    tr.appendChild(el("td", r.state + (r.recoveries ? " (" + r.recoveries + " recoveries)" : ""),
      r.state === "ok" ? "ok" : "bad"));
    tr.appendChild(el("td", r.hint === "hold_steady" ? "hold the card steady" : "", "warn"));
    tr.appendChild(el("td", r.last_error || "", "hide-narrow"));
    return tr;
  }));
}

function tapRow(e, fresh) {
  const tr = el("tr", null, fresh ? "new" : "");
  tr.dataset.eventId = e.event_id;
  const when = new Date(e.occurred_at);
  tr.appendChild(el("td", isNaN(when) ? e.occurred_at : when.toLocaleTimeString("sv-SE")));
  const card = el("td");
  card.appendChild(el("span", e.card_uid, "uid"));
  card.appendChild(el("div", e.direction + " · " + e.card_status, "empty"));
  tr.appendChild(card);
  const d = el("td");
  d.appendChild(el("span", e.decision, "badge " + e.decision));
  if (e.reason) d.appendChild(el("div", REASONS[e.reason] || e.reason));
  if (e.seq === 0) d.appendChild(el("div", "decided, not yet stored (disk full)", "bad"));
  tr.appendChild(d);
  tr.appendChild(el("td", e.reader, "hide-narrow"));
  tr.appendChild(el("td", e.seq, "hide-narrow"));
  return tr;
}

function showTaps(list) {
  const body = document.getElementById("taps");
  if (list.length === 0) return;
  body.replaceChildren(...list.slice().reverse().map((e) => tapRow(e, false)));
}

function addTap(e) {
  const body = document.getElementById("taps");
  const placeholder = body.querySelector(".empty-row");
  if (placeholder) placeholder.remove();
  body.insertBefore(tapRow(e, true), body.firstChild);
  while (body.children.length > MAX_TAPS) body.lastChild.remove();
}

function connect() {
  const conn = document.getElementById("conn");
  const live = new EventSource("/api/live");
  const parse = (m) => { try { return JSON.parse(m.data); } catch (_) { return null; } };
  live.addEventListener("open", () => { conn.textContent = "live"; conn.className = "live"; });
  live.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.className = ""; });
  live.addEventListener("snapshot", (m) => {
    const d = parse(m);
    if (!d) return;
    showStatus(d.status);
    showTaps(d.taps);
  });
  live.addEventListener("status", (m) => { const d = parse(m); if (d) showStatus(d.status); });
  live.addEventListener("tap", (m) => { const e = parse(m); if (e) addTap(e); });
}

connect();
