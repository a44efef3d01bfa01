// The official `phoenix` client against a running hub:
//   node phoenix_socket.mjs <socket url> <access token> <user id>
// Connects with `authToken`, joins echo:<user>, gets a reply, heartbeats, then makes the
// server drop the socket (a message over the hard size cap) and checks that the client
// reconnects, rejoins and is answered again. Prints one JSON line; exits 0 on success.
import { Socket } from "phoenix";
import WebSocket from "ws";

const [url, token, userId] = process.argv.slice(2);
const topic = `echo:${userId}`;
const result = { opens: 0, joins: 0, heartbeatReplies: 0, pingReplies: [], closes: [] };

function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, "timed out"), 20000);

const socket = new Socket(url, {
  transport: WebSocket,
  authToken: token,
  params: { device_id: "node-client", device_kind: "desktop" },
  heartbeatIntervalMs: 200,
  reconnectAfterMs: () => 100,
  rejoinAfterMs: () => 100,
});
socket.onOpen(() => { result.opens += 1; });
socket.onClose((event) => { result.closes.push(event.code); });
socket.onMessage((message) => {
  if (message.topic === "phoenix" && message.event === "phx_reply") result.heartbeatReplies += 1;
});
socket.connect();

const channel = socket.channel(topic, {});
function ping(n) {
  return new Promise((resolve, reject) => {
    channel.push("ping", { n })
      .receive("ok", (response) => { result.pingReplies.push(response.n); resolve(); })
      .receive("error", (e) => reject(new Error(`ping error ${JSON.stringify(e)}`)))
      .receive("timeout", () => reject(new Error("ping timeout")));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

channel.join()
  .receive("ok", async () => {
    result.joins += 1;
    try {
      if (result.joins === 1) {
        await ping(1);
        await sleep(700); // a few heartbeats
        if (result.heartbeatReplies < 2) return finish(false, "no heartbeat replies");
        // Far over the hard cap: the server closes the socket (1009).
        channel.push("ping", { blob: "x".repeat(1024 * 1024) });
      } else if (result.joins === 2) {
        await ping(2);
        finish(result.opens >= 2 && result.closes.includes(1009), "reconnected and rejoined");
      }
    } catch (error) {
      finish(false, String(error));
    }
  })
  .receive("error", (e) => finish(false, `join refused: ${JSON.stringify(e)}`));
