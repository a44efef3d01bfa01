// The Segue web page: a reference client and a demo. REST for accounts and the catalog;
// everything live over the socket (segue.js): queue:{me}, devices:{me}, friends:{me}.
import { Socket, Presence, reply } from "/segue.js";

const $ = (id) => document.getElementById(id);
const saved = window.localStorage;
const pageParams = new URLSearchParams(window.location.search);

// ---- identity -------------------------------------------------------------------------

function randomId() {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// One id per browser profile, kept, so this tab is the same device after a reload.
const deviceId = saved.getItem("segue.device_id") || `web-${randomId()}`;
saved.setItem("segue.device_id", deviceId);
// `?device=Kitchen` names the device (remembered); otherwise a name from the browser.
if (pageParams.get("device")) saved.setItem("segue.device_name", pageParams.get("device").slice(0, 50));
const deviceName = saved.getItem("segue.device_name")
  || `Web on ${(navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || "a browser"}`.slice(0, 50);

// The access token (short-lived) is kept here so tabs share it. The refresh token never is:
// the server keeps it in an HttpOnly cookie sent only to /auth/refresh, out of any script's
// reach (logins ask for that with refresh_token_in: "cookie").
let auth = JSON.parse(saved.getItem("segue.auth") || "null");

function saveAuth(body) {
  auth = body ? { access_token: body.access_token, user: body.user || auth.user, expires_in: body.expires_in } : null;
  if (auth) saved.setItem("segue.auth", JSON.stringify(auth));
  else saved.removeItem("segue.auth");
}

// A login saved by an older page kept its refresh token here: move it into the cookie.
async function moveRefreshTokenIntoCookie() {
  if (!auth || !auth.refresh_token) return;
  const legacy = auth.refresh_token;
  const res = await fetch("/auth/refresh", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ refresh_token: legacy, refresh_token_in: "cookie" }),
  }).catch(() => null);
  if (res && res.ok) saveAuth(await res.json());
  else if (res && res.status === 401) saveAuth(null);
  // Otherwise (the server is unwell) keep it and try at the next load.
}

// ---- REST -----------------------------------------------------------------------------

let refreshing = null;

// Refresh tokens rotate, and reusing a spent one ends the login: tabs of one browser share
// the refresh cookie, so a refresh runs under a cross-tab lock and first looks whether another
// tab already did it (the server also gives a retry within a few seconds the same answer).
async function refreshTokens() {
  if (!auth) return false;
  const stale = auth.access_token;
  const run = async () => {
    const latest = JSON.parse(saved.getItem("segue.auth") || "null");
    if (!latest) return false;
    if (latest.access_token !== stale) { auth = latest; return true; }
    // The cookie carries the refresh token; the body says nothing.
    const res = await fetch("/auth/refresh", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    // 401: refused, the login has ended. 422: no cookie came (a browser keeps the Secure
    // cookie only on https:// or localhost pages), so there is nothing to refresh with.
    if (res.status === 401 || res.status === 422) return false;
    if (!res.ok) throw new Error(`refresh failed (${res.status})`); // try again later
    saveAuth(await res.json());
    return true;
  };
  refreshing = refreshing
    || (navigator.locks ? navigator.locks.request("segue.refresh", run) : run()).finally(() => { refreshing = null; });
  return refreshing;
}

// Another tab refreshed or signed out.
window.addEventListener("storage", (event) => {
  if (event.key !== "segue.auth") return;
  const next = JSON.parse(event.newValue || "null");
  if (!next && auth) window.location.reload();
  auth = next;
});

async function api(method, path, body, retried = false) {
  const headers = {};
  if (auth) headers.authorization = `Bearer ${auth.access_token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401 && auth && !retried) {
    const refreshed = await refreshTokens().catch(() => null);
    if (refreshed) return api(method, path, body, true);
    if (refreshed === false) signOut(); // null: the server is unwell; keep the login
  }
  return res;
}

async function errorOf(res) {
  try { return (await res.json()).detail || res.statusText; } catch { return res.statusText; }
}

// ---- state ----------------------------------------------------------------------------

const view = {
  queue: { revision: 0, state: { track_ids: [], entry_ids: [], current_index: 0 }, tracks: [] },
  tracks: new Map(), // id -> track, from hydration and the catalog
  devices: null, // Presence of devices:{me}
  friends: null, // Presence of friends:{me}
  following: [], // [{id, handle, display_name}]
  output: null,
  playing: false,
  progressMs: 0,
};

let socket = null;
let queueChannel = null;
let devicesChannel = null;

function notice(text) {
  const el = $("notice");
  el.textContent = text;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { el.textContent = ""; }, 6000);
}

function deviceLabel(id) {
  if (id === deviceId) return "this device";
  const entry = view.devices && view.devices.list().find(([key]) => key === id);
  return entry ? entry[1][0].name : id;
}

// ---- queue ----------------------------------------------------------------------------

function currentEntry(state) {
  return state.entry_ids && state.entry_ids.length ? state.entry_ids[state.current_index] : null;
}

function takeQueue(payload) {
  if (payload.revision < view.queue.revision) return;
  const before = currentEntry(view.queue.state);
  view.queue = { revision: payload.revision, state: payload.state, tracks: payload.tracks || [] };
  for (const track of view.queue.tracks) view.tracks.set(track.id, track);
  if (currentEntry(payload.state) !== before) {
    // Another track is current: it starts from the top, and the devices hear so.
    view.progressMs = 0;
    reportPlaying();
  }
  renderQueue();
}

async function ops(list) {
  try {
    const response = await reply(queueChannel.push("ops", { base_revision: view.queue.revision, ops: list }));
    const skipped = response.skipped ? response.skipped.length : 0;
    const named = list.some((op) => op.entry_id);
    if (skipped && named) notice("That entry changed on another device first, so nothing was done to it.");
    else if (skipped && list.length === 1 && list[0].op === "next") notice("That was the last track.");
  } catch (error) {
    notice(`The queue did not change: ${error.message}`);
  }
}

// Artwork from the now-playing pipeline: a <picture> with WebP and JPEG `srcset`s over the
// four sizes, for a box `px` wide (the browser picks the size). Empty for no artwork.
function artworkFor(id, px) {
  const track = view.tracks.get(id);
  const art = track && track.artwork;
  const box = document.createElement("span");
  box.className = "art";
  box.style.width = box.style.height = `${px}px`;
  if (!art) return box;
  const picture = document.createElement("picture");
  const webp = document.createElement("source");
  webp.type = "image/webp";
  webp.srcset = art.sizes.map((s) => `${s.webp} ${s.width}w`).join(", ");
  webp.sizes = `${px}px`;
  const img = document.createElement("img");
  img.srcset = art.sizes.map((s) => `${s.jpeg} ${s.width}w`).join(", ");
  img.sizes = `${px}px`;
  img.src = art.sizes[0].jpeg;
  img.alt = "";
  img.width = img.height = px;
  picture.append(webp, img);
  box.append(picture);
  return box;
}

// A report from the pipeline carries its catalog track (with artwork once it is ready):
// keep it, so every list shows the newest copy.
function learnTrack(nowPlaying) {
  if (nowPlaying && nowPlaying.track) view.tracks.set(nowPlaying.track.id, nowPlaying.track);
}

function trackText(id) {
  const track = view.tracks.get(id);
  return track ? `${track.title} — ${track.artist}` : id;
}

// Re-rendering a list replaces its elements: put focus back on the same control of the same
// item (by `data-key` and the control's label), so keyboard users keep their place.
function keepingFocus(list, render) {
  const focused = document.activeElement;
  const item = focused && list.contains(focused) ? focused.closest("li") : null;
  const key = item && item.dataset.key;
  const label = focused && focused !== item ? focused.getAttribute("aria-label") : null;
  render();
  if (!key) return;
  const again = [...list.children].find((li) => li.dataset.key === key);
  if (!again) return;
  const control = label ? [...again.querySelectorAll("button")].find((b) => b.getAttribute("aria-label") === label) : null;
  (control || again).focus();
}

function renderQueue() {
  keepingFocus($("up-next"), renderUpNext);
  renderPlayButton();
}

function renderUpNext() {
  const { state } = view.queue;
  const ids = state.track_ids || [];
  const entries = state.entry_ids || [];
  const current = ids.length ? state.current_index : -1;
  $("now-track").textContent = current >= 0 ? trackText(ids[current]) : "Nothing yet";
  $("now-art").replaceChildren(current >= 0 ? artworkFor(ids[current], 96) : "");
  $("shuffle").setAttribute("aria-pressed", String(Boolean(state.shuffle)));
  $("repeat").textContent = `Repeat: ${state.repeat_mode || "none"}`;
  const list = $("up-next");
  list.replaceChildren();
  for (let index = current + 1; index < ids.length; index += 1) {
    const entry = entries[index];
    const item = document.createElement("li");
    item.draggable = true;
    item.dataset.entry = entry;
    item.dataset.key = entry;
    item.tabIndex = 0;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = trackText(ids[index]);
    item.append(artworkFor(ids[index], 40), title,
      button("Play", `Play ${trackText(ids[index])} now`, () => ops([{ op: "jump", entry_id: entry }])),
      button("Up", `Move ${trackText(ids[index])} up`, () => moveBy(entry, -1)),
      button("Down", `Move ${trackText(ids[index])} down`, () => moveBy(entry, 1)),
      button("Remove", `Remove ${trackText(ids[index])}`, () => ops([{ op: "remove", entry_id: entry }])));
    item.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", entry); item.classList.add("dragging"); });
    item.addEventListener("dragend", () => item.classList.remove("dragging"));
    item.addEventListener("dragover", (e) => { e.preventDefault(); item.classList.add("drop-target"); });
    item.addEventListener("dragleave", () => item.classList.remove("drop-target"));
    item.addEventListener("drop", (e) => {
      e.preventDefault();
      item.classList.remove("drop-target");
      const moved = e.dataTransfer.getData("text/plain");
      const after = entryBefore(entry);
      if (moved && moved !== entry && moved !== after) ops([{ op: "move", entry_id: moved, after_entry_id: after }]);
    });
    list.append(item);
  }
  renderNowWhere();
}

// The entry before `entry` in up-next (null: right after the current entry).
function entryBefore(entry) {
  const { state } = view.queue;
  const index = state.entry_ids.indexOf(entry);
  return index - 1 > state.current_index ? state.entry_ids[index - 1] : null;
}

function moveBy(entry, delta) {
  const { state } = view.queue;
  const index = state.entry_ids.indexOf(entry);
  const target = index + delta;
  if (target <= state.current_index || target >= state.entry_ids.length) return;
  // Moving down puts it after its next neighbour; moving up after the one two above.
  const after = delta > 0 ? state.entry_ids[target] : (target - 1 > state.current_index ? state.entry_ids[target - 1] : null);
  ops([{ op: "move", entry_id: entry, after_entry_id: after }]);
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// ---- playing (this page is a player: a simulated clock, reported as now_playing) -------

function currentTrackId() {
  const { state } = view.queue;
  return state.track_ids && state.track_ids.length ? state.track_ids[state.current_index] : null;
}

function reportPlaying() {
  view.reportedAt = Date.now();
  if (!devicesChannel || devicesChannel.state !== "joined") return;
  const track = currentTrackId();
  const payload = view.playing && track
    ? { track_id: track, progress_ms: Math.floor(view.progressMs), is_playing: true }
    : { track_id: track, progress_ms: Math.floor(view.progressMs), is_playing: false };
  devicesChannel.push("now_playing", payload);
}

function setPlaying(on) {
  view.playing = on && Boolean(currentTrackId());
  renderPlayButton();
  reportPlaying();
  renderNowWhere();
}

setInterval(() => {
  if (!view.playing) return;
  view.progressMs += 1000;
  const track = view.tracks.get(currentTrackId());
  if (track && track.duration_ms && view.progressMs >= track.duration_ms) {
    view.progressMs = 0;
    advance();
  } else if (Date.now() - (view.reportedAt || 0) >= 10000) {
    reportPlaying();
  }
}, 1000);

// At a track's end: jump to the entry after this one by name, so that two players that both
// reach the end (tabs of one browser are one device) cannot skip a track between them.
function advance() {
  const { state } = view.queue;
  if (state.repeat_mode === "one") { reportPlaying(); return; }
  const following = state.entry_ids[state.current_index + 1];
  if (following) ops([{ op: "jump", entry_id: following }]);
  else if (state.repeat_mode === "all" && state.entry_ids.length) ops([{ op: "jump", entry_id: state.entry_ids[0] }]);
  else setPlaying(false);
}

function renderNowWhere() {
  const output = view.output;
  $("now-where").textContent = output && output !== deviceId
    ? `Playing on ${deviceLabel(output)}`
    : view.playing ? "Playing here" : "";
}

// Whether the output device (this one or another) is playing now.
function outputPlaying() {
  if (!view.output || view.output === deviceId) return view.playing;
  const entry = view.devices && view.devices.list().find(([key]) => key === view.output);
  return Boolean(entry && entry[1].some((m) => m.now_playing && m.now_playing.is_playing));
}

function renderPlayButton() {
  const playing = outputPlaying();
  $("play").textContent = playing ? "Pause" : "Play";
  $("play").setAttribute("aria-label", playing ? "Pause" : "Play");
}

function command(action) {
  // The play button drives this page, or sends the command to the output device.
  if (view.output && view.output !== deviceId) {
    devicesChannel.push("command", { device_id: view.output, action });
    return;
  }
  if (action === "play") setPlaying(true);
  if (action === "pause") setPlaying(false);
}

// ---- devices and friends ---------------------------------------------------------------

function renderDevices() {
  keepingFocus($("devices"), renderDeviceList);
  renderPlayButton();
}

function renderDeviceList() {
  const list = $("devices");
  list.replaceChildren();
  view.output = null;
  for (const [id, metas] of view.devices.list()) {
    const meta = metas[0];
    const item = document.createElement("li");
    item.dataset.key = id;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = id === deviceId ? `${meta.name} (this device)` : meta.name;
    item.append(title);
    if (meta.now_playing && meta.now_playing.track_id) {
      learnTrack(meta.now_playing);
      item.prepend(artworkFor(meta.now_playing.track_id, 40));
      const playing = document.createElement("span");
      playing.className = "muted small";
      playing.textContent = trackText(meta.now_playing.track_id);
      item.append(playing);
    }
    if (metas.some((m) => m.is_output)) {
      view.output = id;
      const badge = document.createElement("span");
      badge.className = "badge output";
      badge.textContent = "output";
      item.append(badge);
    } else {
      item.append(button("Play here", `Play on ${meta.name}`, () => transfer(id)));
    }
    list.append(item);
  }
  renderNowWhere();
}

async function transfer(id) {
  try {
    await reply(devicesChannel.push("transfer", { device_id: id, play: view.playing }));
  } catch (error) {
    notice(`Could not move playback: ${error.message}`);
  }
}

function renderFriends() {
  const list = $("friends");
  list.replaceChildren();
  const entries = view.friends ? view.friends.list() : [];
  if (entries.length === 0) {
    const empty = document.createElement("li");
    empty.className = "muted";
    empty.textContent = "Nobody you follow is online.";
    list.append(empty);
  }
  for (const [userId, metas] of entries) {
    const who = view.following.find((f) => String(f.id) === userId);
    const playing = metas.find((m) => m.now_playing && m.now_playing.track_id);
    if (playing) learnTrack(playing.now_playing);
    const item = document.createElement("li");
    if (playing) item.append(artworkFor(playing.now_playing.track_id, 40));
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = who ? who.display_name || who.handle : `user ${userId}`;
    const what = document.createElement("span");
    what.className = "muted small";
    what.textContent = playing ? `listening to ${trackText(playing.now_playing.track_id)}` : "online";
    item.append(title, what);
    list.append(item);
    if (playing) ensureTrack(playing.now_playing.track_id).then((fetched) => { if (fetched) renderFriendsSoon(); });
  }
}

let friendsTimer = null;
function renderFriendsSoon() {
  clearTimeout(friendsTimer);
  friendsTimer = setTimeout(renderFriends, 50);
}

// Fetches a track not known yet; true when it was fetched now (so a re-render shows it).
// Unknown ids are remembered too (as null), so nothing is asked twice.
async function ensureTrack(id) {
  if (view.tracks.has(id)) return false;
  view.tracks.set(id, null);
  const res = await api("GET", `/tracks/${encodeURIComponent(id)}`);
  if (!res.ok) return false;
  view.tracks.set(id, await res.json());
  return true;
}

async function loadFollowing() {
  const res = await api("GET", "/follows/");
  if (!res.ok) return;
  view.following = (await res.json()).following;
  const list = $("following");
  list.replaceChildren();
  for (const f of view.following) {
    const item = document.createElement("li");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = `Following ${f.handle}`;
    item.append(title, button("Unfollow", `Unfollow ${f.handle}`, async () => {
      await api("DELETE", `/follows/${f.id}`);
      loadFollowing();
    }));
    list.append(item);
  }
  renderFriends();
}

// Whether followers (and the public now-playing page) see what this account plays.
async function loadSharing() {
  const res = await api("GET", "/preferences/");
  if (res.ok) $("share-listening").checked = (await res.json()).share_listening !== false;
}

async function setSharing(on) {
  const res = await api("PATCH", "/preferences/", { share_listening: on });
  if (!res.ok) {
    $("share-listening").checked = !on;
    notice(`Could not change sharing: ${await errorOf(res)}`);
  }
}

// ---- catalog ----------------------------------------------------------------------------

async function searchCatalog() {
  const q = $("search").value.trim();
  const res = await api("GET", `/tracks?limit=12${q ? `&q=${encodeURIComponent(q)}` : ""}`);
  const list = $("catalog");
  list.replaceChildren();
  if (!res.ok) return;
  for (const track of (await res.json()).tracks) {
    view.tracks.set(track.id, track);
    const item = document.createElement("li");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = `${track.title} — ${track.artist}`;
    item.append(title,
      button("Add", `Add ${track.title} to the queue`, () => ops([{ op: "append", track_ids: [track.id] }])),
      button("Next", `Play ${track.title} next`, () => ops([{ op: "play_next", track_ids: [track.id] }])),
      button("Play", `Play ${track.title} now`, () => ops([{ op: "play_now", track_id: track.id }]).then(() => command("play"))));
    list.append(item);
  }
}

// ---- socket -------------------------------------------------------------------------------

function connect() {
  socket = new Socket("/socket", {
    token: () => auth && auth.access_token,
    params: () => ({ device_id: deviceId, device_name: deviceName, device_kind: "web" }),
  });
  socket.onOpen(() => { $("connection").textContent = "live"; });
  socket.onClose(async (event) => {
    $("connection").textContent = "reconnecting…";
    // A refused upgrade (expired token) looks like a close before open: refresh first.
    if (event.code === 1006 || event.code === 1008) await refreshTokens();
  });
  const me = auth.user.id;

  queueChannel = socket.channel(`queue:${me}`, () => ({ revision: view.queue.revision }));
  queueChannel.on("queue_changed", (payload) => {
    const before = view.queue.revision;
    takeQueue(payload);
    const origin = payload.origin_device_id;
    if (payload.revision > before && origin && origin !== deviceId) notice(`Queue updated on ${deviceLabel(origin)}`);
  });
  queueChannel.join((response) => { if (!response.unchanged) takeQueue(response); },
    (reason) => notice(`Could not open the queue: ${reason}`));

  devicesChannel = socket.channel(`devices:${me}`);
  view.devices = new Presence(devicesChannel);
  view.devices.onSync(renderDevices);
  // The pipeline's enriched track (again once its artwork is ready).
  devicesChannel.on("track", (payload) => {
    learnTrack(payload);
    renderDevices();
    renderQueue();
  });
  devicesChannel.on("output_changed", ({ device_id: id, play }) => {
    view.output = id;
    if (id === deviceId && play) setPlaying(true);
    if (id !== deviceId && view.playing) setPlaying(false);
    renderNowWhere();
  });
  devicesChannel.on("command", ({ action, progress_ms: progress, from_device_id: from }) => {
    notice(`${deviceLabel(from)} asked this device to ${action}`);
    if (action === "play") setPlaying(true);
    else if (action === "pause") setPlaying(false);
    else if (action === "next") ops([{ op: "next" }]);
    else if (action === "previous") ops([{ op: "previous" }]);
    else if (action === "seek" && typeof progress === "number") { view.progressMs = progress; reportPlaying(); }
  });
  devicesChannel.join(() => { view.devices.resync(); reportPlaying(); });

  const friendsChannel = socket.channel(`friends:${me}`);
  view.friends = new Presence(friendsChannel);
  view.friends.onSync(renderFriends);
  friendsChannel.join(() => view.friends.resync());

  socket.connect();
}

// ---- overlays (a streaming program's browser source shows what I play) -----------------

async function loadOverlays() {
  const res = await api("GET", "/overlays");
  if (!res.ok) return;
  const list = $("overlays");
  list.replaceChildren();
  for (const overlay of (await res.json()).overlays) {
    const item = document.createElement("li");
    item.dataset.key = overlay.id;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = overlay.name;
    item.append(title, button("Revoke", `Revoke overlay ${overlay.name}`, () => revokeOverlay(overlay)));
    list.append(item);
  }
}

async function createOverlay() {
  const res = await api("POST", "/overlays", {});
  if (!res.ok) {
    notice(`No overlay was made: ${await errorOf(res)}`);
    return;
  }
  const overlay = await res.json();
  const url = new URL(overlay.page_url, location.origin).href;
  $("overlay-url").value = url;
  $("overlay-new").hidden = false;
  loadOverlays();
}

async function revokeOverlay(overlay) {
  const res = await api("DELETE", `/overlays/${encodeURIComponent(overlay.id)}`);
  if (!res.ok && res.status !== 404) notice(`Could not revoke ${overlay.name}: ${await errorOf(res)}`);
  $("overlay-new").hidden = true;
  loadOverlays();
}

// ---- wiring ---------------------------------------------------------------------------

function signedIn() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = `${auth.user.display_name || auth.user.handle} · ${deviceName}`;
  connect();
  searchCatalog();
  loadFollowing();
  loadSharing();
  loadOverlays();
  // Access tokens are short-lived: renew them at four fifths of their life.
  setInterval(refreshTokens, Math.max(5, Math.floor((auth.expires_in || 900) * 0.8)) * 1000);
}

// Ends the session on the server (which also clears the refresh cookie), then here and in
// every other tab.
async function signOut() {
  const token = auth && auth.access_token;
  saveAuth(null);
  if (socket) socket.disconnect();
  const logout = (bearer) => fetch("/auth/logout", { method: "POST", headers: { authorization: `Bearer ${bearer}` } });
  try {
    if (token && (await logout(token)).status === 401) {
      // The access token ran out: one more from the cookie, to end the session properly.
      const res = await fetch("/auth/refresh", { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
      if (res.ok) await logout((await res.json()).access_token);
    }
  } catch { /* the server is away: the session ends when its tokens expire */ }
  window.location.reload();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter && event.submitter.value === "register" ? "register" : "login";
  $("login-error").textContent = "";
  const res = await fetch(`/auth/${action}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      handle: $("handle").value.trim(),
      password: $("password").value,
      device_id: deviceId,
      device_name: deviceName,
      device_kind: "web",
      refresh_token_in: "cookie",
    }),
  });
  if (!res.ok) {
    $("login-error").textContent = await errorOf(res);
    return;
  }
  saveAuth(await res.json());
  signedIn();
});

$("logout").addEventListener("click", signOut);
$("overlay-create").addEventListener("click", createOverlay);
$("overlay-copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("overlay-url").value);
    notice("Overlay URL copied.");
  } catch {
    $("overlay-url").select();
    notice("Select the URL and copy it.");
  }
});
$("share-listening").addEventListener("change", (event) => setSharing(event.target.checked));
$("play").addEventListener("click", () => command(outputPlaying() ? "pause" : "play"));
$("next").addEventListener("click", () => { view.progressMs = 0; ops([{ op: "next" }]); });
$("previous").addEventListener("click", () => { view.progressMs = 0; ops([{ op: "previous" }]); });
$("shuffle").addEventListener("click", () => ops([{ op: view.queue.state.shuffle ? "unshuffle" : "shuffle" }]));
$("repeat").addEventListener("click", () => {
  const order = ["none", "all", "one"];
  const mode = order[(order.indexOf(view.queue.state.repeat_mode || "none") + 1) % order.length];
  ops([{ op: "set_repeat", mode }]);
});
$("clear").addEventListener("click", () => ops([{ op: "clear_up_next" }]));
$("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchCatalog(); });
$("search").addEventListener("input", () => { clearTimeout(searchCatalog.timer); searchCatalog.timer = setTimeout(searchCatalog, 250); });
$("follow-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("follow-error").textContent = "";
  const handle = $("follow-handle").value.trim();
  const found = await api("GET", `/users/by-handle/${encodeURIComponent(handle)}`);
  if (!found.ok) { $("follow-error").textContent = await errorOf(found); return; }
  const res = await api("POST", `/follows/${(await found.json()).id}`);
  if (!res.ok) { $("follow-error").textContent = await errorOf(res); return; }
  $("follow-handle").value = "";
  loadFollowing();
});
// Keyboard reordering in the list: focus an entry, then Alt+↑ / Alt+↓.
$("up-next").addEventListener("keydown", (event) => {
  const entry = event.target.dataset && event.target.dataset.entry;
  if (!entry || !event.altKey) return;
  if (event.key === "ArrowUp") { event.preventDefault(); moveBy(entry, -1); }
  if (event.key === "ArrowDown") { event.preventDefault(); moveBy(entry, 1); }
});

moveRefreshTokenIntoCookie().finally(() => { if (auth) signedIn(); });
