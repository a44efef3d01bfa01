// The page's own client module (static/segue.js) against a running hub, in Node:
//   node segue_client.mjs '<json config>'
// config: {url: "http://127.0.0.1:<port>", userId, tokenA, tokenB}. Checks joins, replies,
// heartbeats (a socket whose heartbeats went unanswered would reconnect; a silent server
// makes it reconnect at once), reconnect with rejoin after the server drops the socket, and
// the presence merge. Prints one JSON line.
import { readFileSync } from "node:fs";
import WebSocket, { WebSocketServer } from "ws";

const config = JSON.parse(process.argv[2]);
globalThis.WebSocket = WebSocket;
globalThis.window = { location: { href: `${config.url}/` } };
const source = readFileSync(new URL("../../static/segue.js", import.meta.url), "utf8");
const { Socket, Presence, reply } = await import(`data:text/javascript,${encodeURIComponent(source)}`);

const result = { steps: [], opens: 0, closes: [], joins: 0 };
function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after steps ${result.steps.join(", ")}`), 20000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const until = async (check) => { while (!check()) await sleep(10); };

function open(token, device) {
  const socket = new Socket(`${config.url}/socket`, {
    token: () => token,
    params: () => ({ device_id: device, device_name: `Node ${device}` }),
    heartbeatMs: 150,
    reconnectMs: [50],
  });
  return socket;
}

try {
  const a = open(config.tokenA, "module-a");
  a.onOpen(() => { result.opens += 1; });
  a.onClose((event) => { result.closes.push(event.code); });
  const echo = a.channel(`echo:${config.userId}`);
  echo.join(() => { result.joins += 1; });
  a.connect();
  await until(() => result.joins === 1);
  const pong = await reply(echo.push("ping", { n: 1 }));
  if (pong.n !== 1) throw new Error(`ping answered ${JSON.stringify(pong)}`);
  result.steps.push("joined and answered");

  await sleep(800); // more than five heartbeat intervals
  if (result.closes.length !== 0) throw new Error(`closed while heartbeating: ${result.closes}`);
  result.steps.push("heartbeats answered");

  // Far over the server's hard cap: it drops the socket (1009); the module reconnects and
  // rejoins on its own.
  echo.push("ping", { blob: "x".repeat(1024 * 1024) });
  await until(() => result.joins === 2);
  const again = await reply(echo.push("ping", { n: 2 }));
  if (again.n !== 2 || !result.closes.includes(1009) || result.opens < 2) {
    throw new Error("no reconnect and rejoin");
  }
  result.steps.push("reconnected and rejoined");

  const b = open(config.tokenB, "module-b");
  const devices = b.channel(`devices:${config.userId}`);
  const presence = new Presence(devices);
  devices.join(() => presence.resync());
  b.connect();
  const aDevices = a.channel(`devices:${config.userId}`);
  aDevices.join();
  const keys = () => presence.list().map(([key]) => key).sort();
  await until(() => keys().join() === "module-a,module-b");
  result.steps.push("presence lists both devices");

  await until(() => aDevices.state === "joined");
  await reply(aDevices.push("now_playing", { track_id: "t-7", progress_ms: 5, is_playing: true }));
  await until(() => {
    const metas = presence.list().find(([key]) => key === "module-a");
    return metas && metas[1].length === 1 && metas[1][0].now_playing && metas[1][0].now_playing.track_id === "t-7";
  });
  result.steps.push("an update replaces the meta");

  a.disconnect();
  await until(() => keys().join() === "module-b");
  result.steps.push("a device that left is dropped");
  b.disconnect();

  // A server that accepts and then says nothing (a dead connection that never closes): the
  // module gives up on it after one unanswered heartbeat and reconnects at once.
  const silent = new WebSocketServer({ port: 0, handleProtocols: () => "phoenix" });
  await new Promise((resolve) => silent.on("listening", resolve));
  let accepted = 0;
  // Its TCP reads are paused, so not even a close frame is answered.
  silent.on("connection", (ws) => { accepted += 1; ws._socket.pause(); });
  const mute = new Socket(`http://127.0.0.1:${silent.address().port}/socket`, {
    token: () => config.tokenA,
    heartbeatMs: 100,
    reconnectMs: [20],
  });
  mute.connect();
  await until(() => accepted >= 2);
  result.steps.push("an unanswered heartbeat reconnects");
  mute.disconnect();
  silent.close();
  finish(true);
} catch (error) {
  finish(false, String(error));
}
