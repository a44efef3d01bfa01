// The official `phoenix` client's `Presence` class against two hub replicas:
//   node phoenix_presence.mjs '<json config>'
// config: {urlA, urlB, alice: {id, token}, bob: {id, token}, carol: {id, token}}; Bob follows
// Alice, Carol follows nobody. Two devices of Alice (one per replica) watch devices:<alice>;
// Bob (replica A) and Carol (replica B) watch their friends: topics. Alice's second device
// plays a track, then disconnects. Prints one JSON line of what each list showed; exits 0
// when every step was seen.
import { Socket, Presence } from "phoenix";
import WebSocket from "ws";

const config = JSON.parse(process.argv[2]);
const result = { steps: [], carolKeys: [], leaves: [] };

function finish(ok, reason) {
  console.log(JSON.stringify({ ok, reason, ...result }));
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after steps ${result.steps.join(",")}`), 20000);

function connect(url, token, device) {
  const socket = new Socket(url, {
    transport: WebSocket,
    authToken: token,
    params: { device_id: device, device_name: `Node ${device}`, device_kind: "desktop" },
    heartbeatIntervalMs: 500,
  });
  socket.connect();
  return socket;
}

function watch(socket, topic) {
  const channel = socket.channel(topic, {});
  const presence = new Presence(channel);
  return new Promise((resolve, reject) => {
    channel.join()
      .receive("ok", (reply) => resolve({ channel, presence, reply }))
      .receive("error", (e) => reject(new Error(`join ${topic}: ${JSON.stringify(e)}`)));
  });
}

// Resolves once `check()` is true, re-checking on every sync of `presences`.
function until(step, check, ...presences) {
  return new Promise((resolve) => {
    let done = false;
    const test = () => {
      if (done) return true;
      if (check()) {
        done = true;
        result.steps.push(step);
        resolve();
        return true;
      }
      return false;
    };
    if (test()) return;
    const timer = setInterval(() => { if (test()) clearInterval(timer); }, 10);
    presences.forEach((p) => p.onSync(() => { if (test()) clearInterval(timer); }));
  });
}

const byKey = (presence) =>
  Object.fromEntries(presence.list((key, { metas }) => [key, metas]));

const { alice, bob, carol } = config;
const aliceA = connect(config.urlA, alice.token, "alice-a");
const aliceB = connect(config.urlB, alice.token, "alice-b");
const bobSocket = connect(config.urlA, bob.token, "bob-1");
const carolSocket = connect(config.urlB, carol.token, "carol-1");

try {
  const onA = await watch(aliceA, `devices:${alice.id}`);
  const onB = await watch(aliceB, `devices:${alice.id}`);
  result.joinReply = onB.reply;
  onA.presence.onLeave((key, current, left) => {
    result.leaves.push({ key, remaining: current ? current.metas.length : 0, left: left.metas.length });
  });
  const bobFriends = await watch(bobSocket, `friends:${bob.id}`);
  const carolFriends = await watch(carolSocket, `friends:${carol.id}`);
  carolFriends.presence.onSync(() => {
    result.carolKeys.push(...Object.keys(byKey(carolFriends.presence)));
  });

  await until("both devices listed on both replicas", () => {
    const a = byKey(onA.presence);
    const b = byKey(onB.presence);
    return ["alice-a", "alice-b"].every((d) => a[d]?.length === 1 && b[d]?.length === 1);
  }, onA.presence, onB.presence);

  await new Promise((resolve, reject) => {
    onB.channel.push("now_playing", { track_id: "t-42", progress_ms: 1000, is_playing: true })
      .receive("ok", resolve)
      .receive("error", (e) => reject(new Error(JSON.stringify(e))));
  });
  await until("the other device sees the update as one meta", () => {
    const metas = byKey(onA.presence)["alice-b"];
    return metas?.length === 1 && metas[0].now_playing?.track_id === "t-42";
  }, onA.presence);

  await until("the follower sees both devices and the track", () => {
    const metas = byKey(bobFriends.presence)[String(alice.id)];
    return metas?.length === 2 && metas.some((m) => m.now_playing?.track_id === "t-42");
  }, bobFriends.presence);

  aliceB.disconnect();
  await until("the device that left is gone from the other's list", () => {
    const a = byKey(onA.presence);
    return a["alice-a"] && !a["alice-b"];
  }, onA.presence);
  await until("and from the follower's list", () => {
    const metas = byKey(bobFriends.presence)[String(alice.id)];
    return metas?.length === 1 && metas[0].device_id === "alice-a";
  }, bobFriends.presence);

  result.carolFinal = Object.keys(byKey(carolFriends.presence));
  finish(true);
} catch (error) {
  finish(false, String(error));
}
