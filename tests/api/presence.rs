//! Presence: the registry's acceptance suite on both implementations, `devices:` and
//! `friends:` across replicas on both buses, transfer and command, offline by TTL, quick
//! reconnects, play history, and the presence REST endpoints.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{Account, ClusterBus, TestApp, redis_url, spawn_cluster, unique};
use crate::phoenix::{PhxClient, connect_url, socket_url};

/// A presence list merged from `presence_state` and `presence_diff` exactly as the
/// `phoenix` client's `Presence.syncState` / `syncDiff` do.
#[derive(Debug, Default)]
pub struct PresenceList {
    pub keys: BTreeMap<String, Vec<Value>>,
}

impl PresenceList {
    pub fn apply(&mut self, frame: &Value) {
        match frame[3].as_str() {
            Some("presence_state") => {
                self.keys = frame[4]
                    .as_object()
                    .expect("state is an object")
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v["metas"].as_array().cloned().unwrap_or_default(),
                        )
                    })
                    .collect();
            }
            Some("presence_diff") => {
                let diff = &frame[4];
                for (key, joined) in diff["joins"].as_object().expect("joins") {
                    let metas = self.keys.entry(key.clone()).or_default();
                    for meta in joined["metas"].as_array().expect("metas") {
                        if !metas.iter().any(|m| m["phx_ref"] == meta["phx_ref"]) {
                            metas.insert(0, meta.clone());
                        }
                    }
                }
                for (key, left) in diff["leaves"].as_object().expect("leaves") {
                    let refs: Vec<&Value> = left["metas"]
                        .as_array()
                        .expect("metas")
                        .iter()
                        .map(|m| &m["phx_ref"])
                        .collect();
                    if let Some(metas) = self.keys.get_mut(key) {
                        metas.retain(|m| !refs.contains(&&m["phx_ref"]));
                        if metas.is_empty() {
                            self.keys.remove(key);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    pub fn metas(&self, key: &str) -> &[Value] {
        self.keys.get(key).map_or(&[], Vec::as_slice)
    }
}

fn is_presence_on(frame: &Value, topic: &str) -> bool {
    frame[2] == topic && (frame[3] == "presence_state" || frame[3] == "presence_diff")
}

/// Applies presence frames of `topic` until `done` holds for the list (or fails after 10 s).
pub async fn until(
    client: &mut PhxClient,
    topic: &str,
    list: &mut PresenceList,
    done: impl Fn(&PresenceList) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(list) {
        assert!(
            Instant::now() < deadline,
            "presence on {topic} never got there: {list:?}"
        );
        let frame = client.next_matching(|f| is_presence_on(f, topic)).await;
        list.apply(&frame);
    }
}

/// Like [`until`], heartbeating every 200 ms while it waits (for short presence TTLs).
async fn until_beating(
    client: &mut PhxClient,
    topic: &str,
    list: &mut PresenceList,
    done: impl Fn(&PresenceList) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(list) {
        assert!(
            Instant::now() < deadline,
            "presence on {topic} never got there: {list:?}"
        );
        client.push(None, "phoenix", "heartbeat", json!({})).await;
        if client
            .sees_within(Duration::from_millis(200), |f| is_presence_on(f, topic))
            .await
        {
            let frame = client.next_matching(|f| is_presence_on(f, topic)).await;
            list.apply(&frame);
        }
    }
}

/// A socket of `account` speaking for device `device`.
pub async fn device_socket(app: &TestApp, account: &Account, device: &str) -> PhxClient {
    let query = format!(
        "vsn=2.0.0&token={}&device_id={device}&device_name=Device%20{device}&device_kind=desktop",
        account.access_token
    );
    connect_url(&socket_url(app, &query))
        .await
        .expect("socket connects")
}

/// Joins `topic` and returns the join ref (the reply must be ok).
async fn join(client: &mut PhxClient, topic: &str) -> String {
    client.join_ok(topic).await
}

async fn post(app: &TestApp, path: &str, token: &str, body: Option<Value>) -> reqwest::Response {
    let request = app.client.post(app.url(path)).bearer_auth(token);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    request.send().await.expect("request")
}

async fn delete(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .delete(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

crate::on_both_buses!(
    devices_of_one_user_see_each_other_join_play_and_leave_across_replicas,
    transfer_and_commands_reach_devices_on_the_other_replica,
    friends_see_followed_users_only_and_follow_changes_while_joined,
    rest_players_show_up_everywhere_and_by_handle_answers_the_same_on_every_replica,
    a_user_who_stops_sharing_leaves_followers_views_and_the_public_page_everywhere,
);

async fn devices_of_one_user_see_each_other_join_play_and_leave_across_replicas(
    replicas: Vec<TestApp>,
) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let topic = format!("devices:{}", alice.id);
    let mut phone = device_socket(a, &alice, "phone-1").await;
    let (_, reply) = phone.join(&topic, json!({})).await;
    assert_eq!(reply[4]["response"], json!({"device_id": "phone-1"}));
    let mut phone_list = PresenceList::default();
    until(&mut phone, &topic, &mut phone_list, |l| {
        l.keys.contains_key("phone-1")
    })
    .await;
    let meta = &phone_list.metas("phone-1")[0];
    assert_eq!(meta["name"], "Device phone-1");
    assert_eq!(meta["kind"], "desktop");
    assert_eq!(meta["is_output"], false);
    assert_eq!(meta["now_playing"], Value::Null);
    assert!(meta["phx_ref"].as_str().is_some_and(|r| !r.is_empty()));

    let mut laptop = device_socket(b, &alice, "laptop-1").await;
    let laptop_ref = join(&mut laptop, &topic).await;
    let mut laptop_list = PresenceList::default();
    until(&mut laptop, &topic, &mut laptop_list, |l| l.keys.len() == 2).await;
    until(&mut phone, &topic, &mut phone_list, |l| l.keys.len() == 2).await;

    let reference = laptop
        .push(
            Some(&laptop_ref),
            &topic,
            "now_playing",
            json!({"track_id": "t1", "progress_ms": 1500, "is_playing": true}),
        )
        .await;
    assert_eq!(laptop.reply_to(&reference).await[4]["status"], "ok");
    until(&mut phone, &topic, &mut phone_list, |l| {
        l.metas("laptop-1")
            .first()
            .is_some_and(|m| m["now_playing"]["track_id"] == "t1")
    })
    .await;
    let metas = phone_list.metas("laptop-1");
    assert_eq!(metas.len(), 1, "an update replaces the meta: {metas:?}");
    assert_eq!(metas[0]["now_playing"]["progress_ms"], 1500);
    assert_eq!(metas[0]["now_playing"]["is_playing"], true);
    assert!(metas[0]["now_playing"]["at"].as_i64().is_some());
    assert!(metas[0]["phx_ref_prev"].as_str().is_some());

    // A bad report is refused and changes nothing.
    let reference = laptop
        .push(
            Some(&laptop_ref),
            &topic,
            "now_playing",
            json!({"track_id": "t2", "progress_ms": -5}),
        )
        .await;
    let reply = laptop.reply_to(&reference).await;
    assert_eq!(reply[4]["status"], "error");
    assert!(
        reply[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("progress_ms")
    );

    drop(laptop);
    until(&mut phone, &topic, &mut phone_list, |l| {
        !l.keys.contains_key("laptop-1")
    })
    .await;
    assert_eq!(phone_list.keys.len(), 1);
    assert!(
        !phone
            .sees_within(Duration::from_millis(300), |f| f[3] == "presence_diff"
                && f[4]["joins"].get("laptop-1").is_some())
            .await,
        "the laptop must not come back"
    );
}

async fn transfer_and_commands_reach_devices_on_the_other_replica(replicas: Vec<TestApp>) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let topic = format!("devices:{}", alice.id);
    let mut phone = device_socket(a, &alice, "phone").await;
    let mut speaker = device_socket(b, &alice, "speaker").await;
    let mut tablet = device_socket(a, &alice, "tablet").await;
    let phone_ref = join(&mut phone, &topic).await;
    join(&mut speaker, &topic).await;
    join(&mut tablet, &topic).await;
    let mut list = PresenceList::default();
    until(&mut phone, &topic, &mut list, |l| l.keys.len() == 3).await;

    let reference = phone
        .push(
            Some(&phone_ref),
            &topic,
            "transfer",
            json!({"device_id": "speaker", "play": true}),
        )
        .await;
    let reply = phone.reply_to(&reference).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(reply[4]["response"], json!({"device_id": "speaker"}));
    for client in [&mut phone, &mut speaker, &mut tablet] {
        let changed = client.event(&topic, "output_changed").await;
        assert_eq!(changed[4], json!({"device_id": "speaker", "play": true}));
    }
    until(&mut phone, &topic, &mut list, |l| {
        l.metas("speaker")
            .first()
            .is_some_and(|m| m["is_output"] == true)
    })
    .await;
    assert_eq!(list.metas("phone")[0]["is_output"], false);

    // A command reaches the target device only, on whichever replica it is.
    let reference = phone
        .push(
            Some(&phone_ref),
            &topic,
            "command",
            json!({"device_id": "speaker", "action": "seek", "progress_ms": 42000}),
        )
        .await;
    assert_eq!(phone.reply_to(&reference).await[4]["status"], "ok");
    let command = speaker.event(&topic, "command").await;
    assert_eq!(
        command[4],
        json!({"action": "seek", "progress_ms": 42000, "from_device_id": "phone"})
    );
    let is_command = |f: &Value| f[3] == "command";
    assert!(
        !tablet
            .sees_within(Duration::from_millis(300), is_command)
            .await
    );
    assert!(
        !phone
            .sees_within(Duration::from_millis(50), is_command)
            .await
    );

    // Unknown, offline and malformed targets are refused with a reason.
    let cases = [
        (
            json!({"device_id": "nowhere", "action": "play"}),
            "unknown device",
        ),
        (json!({"device_id": "speaker", "action": "dance"}), "action"),
        (json!({"device_id": "speaker"}), "invalid payload"),
    ];
    for (payload, reason) in cases {
        let reference = phone
            .push(Some(&phone_ref), &topic, "command", payload.clone())
            .await;
        let reply = phone.reply_to(&reference).await;
        assert_eq!(reply[4]["status"], "error", "{payload}");
        let said = reply[4]["response"]["reason"].as_str().unwrap_or_default();
        assert!(said.contains(reason), "{payload}: {said}");
    }
    drop(tablet);
    until(&mut phone, &topic, &mut list, |l| {
        !l.keys.contains_key("tablet")
    })
    .await;
    let reference = phone
        .push(
            Some(&phone_ref),
            &topic,
            "transfer",
            json!({"device_id": "tablet"}),
        )
        .await;
    let reply = phone.reply_to(&reference).await;
    assert_eq!(reply[4]["response"]["reason"], "device offline");
    // The output stayed where it was.
    assert_eq!(list.metas("speaker")[0]["is_output"], true);
}

async fn friends_see_followed_users_only_and_follow_changes_while_joined(replicas: Vec<TestApp>) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let bob = a.register().await;
    let carol = a.register().await;
    let dave = a.register().await;
    let followed = post(
        a,
        &format!("/follows/{}", alice.id),
        &bob.access_token,
        None,
    )
    .await;
    assert_eq!(followed.status(), 201);

    let mut alice_phone = device_socket(a, &alice, "alice-phone").await;
    let alice_ref = join(&mut alice_phone, &format!("devices:{}", alice.id)).await;
    let mut dave_phone = device_socket(a, &dave, "dave-phone").await;
    join(&mut dave_phone, &format!("devices:{}", dave.id)).await;

    let bob_topic = format!("friends:{}", bob.id);
    let mut bob_socket = device_socket(b, &bob, "bob-laptop").await;
    let (_, reply) = bob_socket.join(&bob_topic, json!({})).await;
    assert_eq!(reply[4]["status"], "ok");
    let mut bob_list = PresenceList::default();
    let alice_key = alice.id.to_string();
    until(&mut bob_socket, &bob_topic, &mut bob_list, |l| {
        l.keys.contains_key(&alice_key)
    })
    .await;
    assert_eq!(bob_list.metas(&alice_key)[0]["device_id"], "alice-phone");
    // Issue 10, item 10: a follower sees the device's kind, not its private name.
    assert!(bob_list.metas(&alice_key)[0].get("name").is_none());
    assert!(bob_list.metas(&alice_key)[0]["kind"].is_string());
    assert!(
        !bob_list.keys.contains_key(&dave.id.to_string()),
        "not followed"
    );

    let carol_topic = format!("friends:{}", carol.id);
    let mut carol_socket = device_socket(b, &carol, "carol-laptop").await;
    join(&mut carol_socket, &carol_topic).await;
    let state = carol_socket.event(&carol_topic, "presence_state").await;
    assert_eq!(state[4], json!({}), "a user who follows nobody sees nobody");

    let reference = alice_phone
        .push(
            Some(&alice_ref),
            &format!("devices:{}", alice.id),
            "now_playing",
            json!({"track_id": "song-9", "progress_ms": 0, "is_playing": true}),
        )
        .await;
    assert_eq!(alice_phone.reply_to(&reference).await[4]["status"], "ok");
    until(&mut bob_socket, &bob_topic, &mut bob_list, |l| {
        l.metas(&alice_key)
            .first()
            .is_some_and(|m| m["now_playing"]["track_id"] == "song-9")
    })
    .await;
    assert!(
        bob_list.metas(&alice_key)[0].get("name").is_none(),
        "diffs too"
    );
    assert!(
        !carol_socket
            .sees_within(Duration::from_millis(300), |f| f[3] == "presence_diff")
            .await,
        "a non-follower hears nothing"
    );

    // Following Dave while joined: his device joins Bob's list; unfollowing Alice: hers leaves.
    let dave_key = dave.id.to_string();
    assert_eq!(
        post(a, &format!("/follows/{}", dave.id), &bob.access_token, None)
            .await
            .status(),
        201
    );
    until(&mut bob_socket, &bob_topic, &mut bob_list, |l| {
        l.keys.contains_key(&dave_key)
    })
    .await;
    assert_eq!(
        delete(a, &format!("/follows/{}", alice.id), &bob.access_token)
            .await
            .status(),
        204
    );
    until(&mut bob_socket, &bob_topic, &mut bob_list, |l| {
        !l.keys.contains_key(&alice_key)
    })
    .await;
    let following: Value = a
        .get_with_token("/follows/", &bob.access_token)
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<i64> = following["following"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![dave.id]);

    // Dave going offline leaves Bob's list.
    drop(dave_phone);
    until(&mut bob_socket, &bob_topic, &mut bob_list, |l| {
        l.keys.is_empty()
    })
    .await;
}

async fn rest_players_show_up_everywhere_and_by_handle_answers_the_same_on_every_replica(
    replicas: Vec<TestApp>,
) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    a.seed_tracks(
        &alice,
        &json!([{"id": "song-1", "title": "One", "artist": "Band", "duration_ms": 200000}]),
    )
    .await;
    let path = format!("/now-playing/by-handle/{}", alice.handle);
    for app in [a, b] {
        assert_eq!(app.get(&path).await.status(), 204, "nothing playing yet");
    }
    let reported = post(
        a,
        "/now-playing/",
        &alice.access_token,
        Some(json!({"track_id": "song-1", "progress_ms": 1000, "is_playing": true})),
    )
    .await;
    assert_eq!(reported.status(), 204);
    for app in [a, b] {
        let body = wait_for_playing(app, &path).await;
        assert_eq!(body["track_id"], "song-1");
        assert_eq!(body["track"]["title"], "One");
        assert_eq!(body["user"]["handle"], alice.handle.as_str());
        assert_eq!(body["device"]["device_id"], alice.device_id.as_str());
        // Issue 10, item 10: the public answer names the device's kind, not its private name.
        assert!(body["device"].get("name").is_none(), "{body}");
        assert!(body["device"]["kind"].is_string(), "{body}");
        assert_eq!(body["progress_ms"], 1000);
    }
    let devices: Value = b
        .get_with_token("/devices/", &alice.access_token)
        .await
        .json()
        .await
        .unwrap();
    let listed = &devices["devices"][0];
    assert_eq!(listed["device_id"], alice.device_id.as_str());
    assert_eq!(listed["online"], true);
    assert_eq!(listed["now_playing"]["track_id"], "song-1");

    // Bad reports change nothing.
    for body in [
        json!({"track_id": 5}),
        json!({"track_id": "x", "progress_ms": -1}),
        json!([]),
    ] {
        let response = post(a, "/now-playing/", &alice.access_token, Some(body.clone())).await;
        assert!(
            [400, 422].contains(&response.status().as_u16()),
            "{body}: {}",
            response.status()
        );
    }
    assert_eq!(wait_for_playing(b, &path).await["track_id"], "song-1");

    assert_eq!(
        delete(b, "/now-playing/", &alice.access_token)
            .await
            .status(),
        204
    );
    for app in [a, b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while app.get(&path).await.status() != 204 {
            assert!(Instant::now() < deadline, "still playing after DELETE");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        a.get("/now-playing/by-handle/nobody-at-all").await.status(),
        404
    );
    assert_eq!(
        a.get("/now-playing/by-handle/bad%20handle").await.status(),
        404
    );
}

async fn patch_preferences(app: &TestApp, account: &Account, body: Value) -> reqwest::Response {
    app.patch_preferences(account, &body).await
}

/// `follower`'s laptop joined to `friends:` on `app`, once it shows `followee`: the socket,
/// the topic and the list.
async fn friends_seeing(
    app: &TestApp,
    follower: &Account,
    followee: &Account,
) -> (PhxClient, String, PresenceList) {
    let topic = format!("friends:{}", follower.id);
    let mut laptop = device_socket(app, follower, "bob-laptop").await;
    join(&mut laptop, &topic).await;
    let mut list = PresenceList::default();
    let key = followee.id.to_string();
    until(&mut laptop, &topic, &mut list, |l| {
        l.keys.contains_key(&key)
    })
    .await;
    (laptop, topic, list)
}

/// Reports `track` playing from `socket` (joined to `topic` with `join_ref`); the reply is ok.
async fn report(socket: &mut PhxClient, join_ref: &str, topic: &str, track: &str) {
    let pushed = socket
        .push(
            Some(join_ref),
            topic,
            "now_playing",
            json!({"track_id": track, "progress_ms": 0, "is_playing": true}),
        )
        .await;
    assert_eq!(socket.reply_to(&pushed).await[4]["status"], "ok");
}

/// Issue 10, item 10: `share_listening` off hides the account from every follower's
/// `friends:` view (on every replica, at once and for later joins) and makes the public page
/// answer as for a silent user; on again shows it again.
async fn a_user_who_stops_sharing_leaves_followers_views_and_the_public_page_everywhere(
    replicas: Vec<TestApp>,
) {
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let (alice, bob, carol) = (a.register().await, a.register().await, a.register().await);
    for followee in [&alice, &carol] {
        let path = format!("/follows/{}", followee.id);
        assert_eq!(post(a, &path, &bob.access_token, None).await.status(), 201);
    }
    // Carol stops sharing before anyone watches her.
    let off = patch_preferences(a, &carol, json!({"share_listening": false})).await;
    assert_eq!(off.status(), 200);
    assert_eq!(off.json::<Value>().await.unwrap()["share_listening"], false);

    let alice_topic = format!("devices:{}", alice.id);
    let mut alice_phone = device_socket(a, &alice, "alice-phone").await;
    let alice_ref = join(&mut alice_phone, &alice_topic).await;
    let mut carol_phone = device_socket(a, &carol, "carol-phone").await;
    let carol_ref = join(&mut carol_phone, &format!("devices:{}", carol.id)).await;
    for (socket, reference, topic) in [
        (&mut alice_phone, &alice_ref, &alice_topic),
        (
            &mut carol_phone,
            &carol_ref,
            &format!("devices:{}", carol.id),
        ),
    ] {
        let pushed = socket
            .push(
                Some(reference),
                topic,
                "now_playing",
                json!({"track_id": "song-1", "progress_ms": 0, "is_playing": true}),
            )
            .await;
        assert_eq!(socket.reply_to(&pushed).await[4]["status"], "ok");
    }

    let bob_topic = format!("friends:{}", bob.id);
    let (alice_key, carol_key) = (alice.id.to_string(), carol.id.to_string());
    let mut bob_laptop = device_socket(b, &bob, "bob-laptop").await;
    join(&mut bob_laptop, &bob_topic).await;
    let mut bob_list = PresenceList::default();
    until(&mut bob_laptop, &bob_topic, &mut bob_list, |l| {
        l.metas(&alice_key)
            .first()
            .is_some_and(|m| m["now_playing"]["track_id"] == "song-1")
    })
    .await;
    assert!(
        !bob_list.keys.contains_key(&carol_key),
        "Carol shares nothing"
    );
    let alice_page = format!("/now-playing/by-handle/{}", alice.handle);
    let carol_page = format!("/now-playing/by-handle/{}", carol.handle);
    for app in [a, b] {
        assert_eq!(
            wait_for_playing(app, &alice_page).await["track_id"],
            "song-1"
        );
        assert_eq!(
            app.get(&carol_page).await.status(),
            204,
            "as for a silent user"
        );
    }

    // A refused value changes nothing.
    let bad = patch_preferences(a, &alice, json!({"share_listening": "no"})).await;
    assert_eq!(crate::helpers::error_code(bad, 422).await, "invalid_input");
    assert!(
        !bob_laptop
            .sees_within(Duration::from_millis(300), |f| f[3] == "presence_diff")
            .await
    );
    assert_eq!(b.get(&alice_page).await.status(), 200);

    // Alice stops sharing on replica a: Bob's view on replica b loses her devices.
    let off = patch_preferences(a, &alice, json!({"share_listening": false})).await;
    assert_eq!(off.status(), 200);
    until(&mut bob_laptop, &bob_topic, &mut bob_list, |l| {
        !l.keys.contains_key(&alice_key)
    })
    .await;
    for app in [a, b] {
        assert_eq!(app.get(&alice_page).await.status(), 204);
    }
    // What she plays now reaches no follower, and a new join of Bob's shows nobody.
    report(&mut alice_phone, &alice_ref, &alice_topic, "song-2").await;
    assert!(
        !bob_laptop
            .sees_within(Duration::from_millis(300), |f| f[3] == "presence_diff")
            .await,
        "a hidden user's changes are not sent"
    );
    let mut bob_phone = device_socket(a, &bob, "bob-phone").await;
    join(&mut bob_phone, &bob_topic).await;
    let state = bob_phone.event(&bob_topic, "presence_state").await;
    assert_eq!(state[4], json!({}), "nobody Bob follows shares");
    // Her own devices still see everything.
    let mut alice_list = PresenceList::default();
    let mut alice_laptop = device_socket(b, &alice, "alice-laptop").await;
    join(&mut alice_laptop, &alice_topic).await;
    until(&mut alice_laptop, &alice_topic, &mut alice_list, |l| {
        l.metas("alice-phone")
            .first()
            .is_some_and(|m| m["now_playing"]["track_id"] == "song-2")
    })
    .await;

    // Sharing again: both of Bob's views get her devices back, with what plays now.
    let on = patch_preferences(b, &alice, json!({"share_listening": true})).await;
    assert_eq!(on.status(), 200);
    let mut phone_list = PresenceList::default();
    phone_list.apply(&state);
    for (socket, list) in [
        (&mut bob_laptop, &mut bob_list),
        (&mut bob_phone, &mut phone_list),
    ] {
        until(socket, &bob_topic, list, |l| {
            l.metas(&alice_key).iter().any(|m| {
                m["device_id"] == "alice-phone" && m["now_playing"]["track_id"] == "song-2"
            })
        })
        .await;
        assert!(!list.keys.contains_key(&carol_key));
    }
    assert_eq!(wait_for_playing(a, &alice_page).await["track_id"], "song-2");
}

async fn wait_for_playing(app: &TestApp, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = app.get(path).await;
        if response.status() == 200 {
            return response.json().await.unwrap();
        }
        assert!(Instant::now() < deadline, "{path} never answered 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn follows_refuse_bad_targets_and_change_nothing() {
    let replicas = spawn_cluster(1, ClusterBus::Memory).await;
    let app = &replicas[0];
    let alice = app.register().await;
    let bob = app.register().await;
    let me = format!("/follows/{}", alice.id);
    assert_eq!(
        post(app, &me, &alice.access_token, None).await.status(),
        422
    );
    assert_eq!(
        post(app, "/follows/999999999", &alice.access_token, None)
            .await
            .status(),
        404
    );
    assert_eq!(
        post(app, "/follows/abc", &alice.access_token, None)
            .await
            .status(),
        404
    );
    let bob_path = format!("/follows/{}", bob.id);
    assert_eq!(
        post(app, &bob_path, &alice.access_token, None)
            .await
            .status(),
        201
    );
    assert_eq!(
        post(app, &bob_path, &alice.access_token, None)
            .await
            .status(),
        200
    );
    let unauthenticated = app.client.post(app.url(&bob_path)).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let listed: Value = app
        .get_with_token("/follows/", &alice.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["following"].as_array().unwrap().len(), 1);
    assert_eq!(listed["following"][0]["handle"], bob.handle.as_str());
    assert_eq!(
        delete(app, &bob_path, &alice.access_token).await.status(),
        204
    );
    assert_eq!(
        delete(app, &bob_path, &alice.access_token).await.status(),
        204
    );
}

/// One replica (settings tuned), a user with a `watcher` socket joined to `devices:` and a
/// second device `other`, listed in the watcher's presence.
struct Watching {
    replicas: Vec<TestApp>,
    alice: Account,
    topic: String,
    watcher: PhxClient,
    other: PhxClient,
    list: PresenceList,
}

async fn watching(other: &str, tune: impl Fn(&mut segue::settings::Settings)) -> Watching {
    let replicas = crate::helpers::spawn_cluster_tuned(1, ClusterBus::Memory, tune).await;
    let app = &replicas[0];
    let alice = app.register().await;
    let topic = format!("devices:{}", alice.id);
    let mut watcher = device_socket(app, &alice, "watcher").await;
    join(&mut watcher, &topic).await;
    let other_socket = device_socket(app, &alice, other).await;
    let mut list = PresenceList::default();
    until(&mut watcher, &topic, &mut list, |l| {
        l.keys.contains_key(other)
    })
    .await;
    Watching {
        replicas,
        alice,
        topic,
        watcher,
        other: other_socket,
        list,
    }
}

#[actix_web::test]
async fn a_device_that_stops_heartbeating_goes_offline_after_the_ttl() {
    let Watching {
        replicas: _replicas,
        alice: _,
        topic,
        mut watcher,
        mut other,
        mut list,
    } = watching("silent", |s| s.presence_ttl_secs = 1).await;
    let started = Instant::now();
    // The watcher heartbeats; the silent socket stays open but says nothing.
    until_beating(&mut watcher, &topic, &mut list, |l| {
        !l.keys.contains_key("silent")
    })
    .await;
    let offline_after = started.elapsed();
    assert!(
        offline_after >= Duration::from_millis(900),
        "offline too soon: {offline_after:?}"
    );
    assert!(
        list.keys.contains_key("watcher"),
        "a heartbeating device stays: {list:?}"
    );
    // Heard from again, it comes back.
    other.push(None, "phoenix", "heartbeat", json!({})).await;
    until_beating(&mut watcher, &topic, &mut list, |l| {
        l.keys.contains_key("silent")
    })
    .await;
}

#[actix_web::test]
async fn a_quick_reconnect_does_not_flap() {
    let Watching {
        replicas,
        alice,
        topic,
        mut watcher,
        other: flaky,
        mut list,
    } = watching("flaky", |s| s.presence_leave_delay_ms = 1_500).await;
    let app = &replicas[0];
    drop(flaky);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = device_socket(app, &alice, "flaky").await;
    let leaves_flaky = |f: &Value| f[3] == "presence_diff" && f[4]["leaves"].get("flaky").is_some();
    assert!(
        !watcher
            .sees_within(Duration::from_millis(2_000), leaves_flaky)
            .await
    );
    // Gone for longer than the delay, it leaves.
    drop(back);
    let started = Instant::now();
    until(&mut watcher, &topic, &mut list, |l| {
        !l.keys.contains_key("flaky")
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "left before the delay"
    );
}

#[actix_web::test]
async fn a_play_past_the_threshold_is_recorded_once() {
    let replicas = spawn_cluster(1, ClusterBus::Memory).await;
    let app = &replicas[0];
    let alice = app.register().await;
    // A 2-second track counts after 1 s of listening.
    app.seed_tracks(
        &alice,
        &json!([
            {"id": "short", "title": "Short", "artist": "Band", "duration_ms": 2000},
            {"id": "next", "title": "Next", "artist": "Band", "duration_ms": 600000}
        ]),
    )
    .await;
    let topic = format!("devices:{}", alice.id);
    let mut player = device_socket(app, &alice, "player").await;
    let join_ref = join(&mut player, &topic).await;
    let report = |track: &str, progress: i64| json!({"track_id": track, "progress_ms": progress, "is_playing": true});
    let reference = player
        .push(Some(&join_ref), &topic, "now_playing", report("short", 0))
        .await;
    player.reply_to(&reference).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for progress in [1_150, 1_500] {
        let reference = player
            .push(
                Some(&join_ref),
                &topic,
                "now_playing",
                report("short", progress),
            )
            .await;
        player.reply_to(&reference).await;
    }
    let plays = history_of(app, &alice, 1).await;
    assert_eq!(plays[0]["track_id"], "short");
    assert_eq!(plays[0]["device_id"], "player");
    // The same play reported again, and a next track played briefly, add nothing.
    let reference = player
        .push(Some(&join_ref), &topic, "now_playing", report("next", 0))
        .await;
    player.reply_to(&reference).await;
    let reference = player
        .push(
            Some(&join_ref),
            &topic,
            "now_playing",
            json!({"track_id": null}),
        )
        .await;
    player.reply_to(&reference).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(history_of(app, &alice, 1).await.len(), 1);
    let bad = app
        .get_with_token("/history/?limit=0", &alice.access_token)
        .await;
    assert_eq!(bad.status(), 422);
}

/// Waits until the user's history has at least `count` plays; returns them.
async fn history_of(app: &TestApp, account: &Account, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let plays = app.history(account).await;
        if plays.len() >= count {
            return plays;
        }
        assert!(
            Instant::now() < deadline,
            "history never reached {count}: {plays:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The registry port's acceptance suite, run on both implementations.
mod registry {
    use std::sync::Arc;
    use std::time::Duration;

    use segue::domain::UserId;
    use segue::presence::{
        AnyRegistry, DeviceEntry, MemoryRegistry, NowPlaying, RedisRegistry, Registry, now_ms,
    };

    use super::{redis_url, unique};

    fn entry(device: &str, seq: u64, expires_in_ms: i64) -> DeviceEntry {
        DeviceEntry {
            device_id: device.into(),
            name: format!("{device} name"),
            kind: "phone".into(),
            online_at: now_ms(),
            now_playing: None,
            seq,
            expires_at: now_ms() + expires_in_ms,
        }
    }

    async fn suite(registry: AnyRegistry) {
        let (alice, bob) = (UserId(1), UserId(2));
        let empty = registry.snapshot(alice).await.unwrap();
        assert!(empty.entries.is_empty() && empty.output.is_none());

        registry
            .put(vec![
                (alice, "a/r1".into(), Arc::new(entry("a", 1, 60_000))),
                (alice, "b/r2".into(), Arc::new(entry("b", 1, 60_000))),
                (bob, "c/r1".into(), Arc::new(entry("c", 1, 60_000))),
            ])
            .await
            .unwrap();
        let mut newer = entry("a", 2, 60_000);
        newer.now_playing = Some(NowPlaying {
            track_id: "t".into(),
            progress_ms: 3,
            is_playing: true,
            at: 4,
            track: None,
        });
        registry
            .put(vec![(alice, "a/r1".into(), Arc::new(newer.clone()))])
            .await
            .unwrap();
        let both = registry
            .snapshots(vec![bob, alice, UserId(3)])
            .await
            .unwrap();
        assert_eq!(both.len(), 3, "one snapshot per user asked, in order");
        assert_eq!(both[0].entries.keys().collect::<Vec<_>>(), ["c/r1"]);
        assert_eq!(both[1].entries.len(), 2);
        assert_eq!(
            *both[1].entries["a/r1"], newer,
            "a write replaces the entry"
        );
        assert!(both[2].entries.is_empty());

        registry
            .remove(vec![(alice, "b/r2".into()), (alice, "gone/r9".into())])
            .await
            .unwrap();
        let after = registry.snapshot(alice).await.unwrap();
        assert_eq!(after.entries.keys().collect::<Vec<_>>(), ["a/r1"]);

        registry.set_output(alice, "a".into()).await.unwrap();
        registry.set_output(alice, "b".into()).await.unwrap();
        assert_eq!(
            registry.snapshot(alice).await.unwrap().output.as_deref(),
            Some("b")
        );
        assert!(registry.snapshot(bob).await.unwrap().output.is_none());

        // An entry past its expiry is never returned (its owner stopped refreshing it).
        registry
            .put(vec![(bob, "d/r3".into(), Arc::new(entry("d", 1, 150)))])
            .await
            .unwrap();
        assert!(
            registry
                .snapshot(bob)
                .await
                .unwrap()
                .entries
                .contains_key("d/r3")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let bob_now = registry.snapshot(bob).await.unwrap();
        assert_eq!(bob_now.entries.keys().collect::<Vec<_>>(), ["c/r1"]);
    }

    #[actix_web::test]
    async fn memory() {
        suite(AnyRegistry::Memory(MemoryRegistry::new())).await;
    }

    #[actix_web::test]
    async fn redis() {
        let namespace = unique("segue_registry");
        let url = redis_url();
        let pool = segue::redis::build_pool(&url.clone().into()).unwrap();
        let registry = RedisRegistry::new(pool, &namespace, Duration::from_secs(60));
        suite(AnyRegistry::Redis(registry)).await;

        // A user's hash outlives its last write by the TTL, or by as long as its longest
        // entry lasts (a pipeline report lasts to its track's end), so entries of a replica
        // that died cannot pile up; a later, shorter write never shortens it (from the review:
        // a heartbeat's write cut a pipeline entry's hash to the TTL).
        let pool = segue::redis::build_pool(&url.into()).unwrap();
        let short = RedisRegistry::new(pool.clone(), &namespace, Duration::from_millis(300));
        let mut conn = pool.get().await.unwrap();
        for (user, writes) in [
            (7, [("long/r", 60_000, 60_000), ("short/r", 100, 60_000)]),
            (8, [("short/r", 100, 300), ("long/r", 60_000, 60_000)]),
        ] {
            let key = format!("{namespace}:presence:{user}");
            for (instance, lasts_ms, longest) in writes {
                short
                    .put(vec![(
                        UserId(user),
                        instance.into(),
                        Arc::new(entry("x", 1, lasts_ms)),
                    )])
                    .await
                    .unwrap();
                let ttl: i64 = ::redis::cmd("PTTL")
                    .arg(&key)
                    .query_async(&mut *conn)
                    .await
                    .unwrap();
                assert!(
                    ttl > longest - 1_000 && ttl <= longest,
                    "user {user}: PTTL {ttl} after {instance} lasting {lasts_ms} ms"
                );
            }
        }
        // Clean up what the suite left.
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut *conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = ::redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut *conn)
                .await
                .unwrap();
        }
    }
}

/// Drops a test database when the test ends, however it ends.
#[actix_web::test]
async fn a_replica_killed_with_sigkill_leaves_no_ghost_beyond_the_ttl() {
    use crate::helpers::{DatabaseGuard, HubProcess, fresh_postgres_database};

    const TTL_SECS: u64 = 2;
    let (name, database) = fresh_postgres_database().await;
    let _guard = DatabaseGuard(name);
    let namespace = unique("segue_kill");
    let redis = redis_url();
    let ttl = TTL_SECS.to_string();
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("SEGUE_REDIS_NAMESPACE", namespace.as_str()),
        ("SEGUE_PRESENCE_TTL_SECS", ttl.as_str()),
        ("SEGUE_LOG", "warn"),
    ];
    let mut doomed = HubProcess::start(&env).await;
    let survivor = HubProcess::start(&env).await;
    let client = reqwest::Client::new();
    let body: Value = client
        .post(format!("{}/auth/register", survivor.address))
        .json(&json!({"handle": unique("k").replace('_', ""), "password": "correct horse"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    let user = body["user"]["id"].as_i64().unwrap();
    let topic = format!("devices:{user}");
    let url = |address: &str, device: &str| {
        format!(
            "{}/socket/websocket?vsn=2.0.0&token={token}&device_id={device}",
            address.replacen("http", "ws", 1)
        )
    };
    let mut doomed_device = connect_url(&url(&doomed.address, "on-doomed"))
        .await
        .unwrap();
    let mut watcher = connect_url(&url(&survivor.address, "watcher"))
        .await
        .unwrap();
    join(&mut watcher, &topic).await;
    let mut list = PresenceList::default();
    until_beating(&mut watcher, &topic, &mut list, |l| {
        l.keys.contains_key("on-doomed")
    })
    .await;

    // Both keep heartbeating for longer than the TTL: the device stays listed.
    let alive_until = Instant::now() + Duration::from_secs(TTL_SECS + 1);
    while Instant::now() < alive_until {
        doomed_device
            .push(None, "phoenix", "heartbeat", json!({}))
            .await;
        watcher.push(None, "phoenix", "heartbeat", json!({})).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let leaves_doomed =
        |f: &Value| f[3] == "presence_diff" && f[4]["leaves"].get("on-doomed").is_some();
    assert!(
        !watcher
            .sees_within(Duration::from_millis(10), leaves_doomed)
            .await
    );
    assert!(list.keys.contains_key("on-doomed"));

    doomed.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    doomed.child.wait().expect("reaped");
    until_beating(&mut watcher, &topic, &mut list, |l| {
        !l.keys.contains_key("on-doomed")
    })
    .await;
    let gone_after = killed.elapsed();
    println!(
        "presence: device of a SIGKILLed replica left the other replica's list after {} ms (TTL {} s)",
        gone_after.as_millis(),
        TTL_SECS
    );
    assert!(
        gone_after <= Duration::from_secs(TTL_SECS) + Duration::from_millis(1_500),
        "ghost lasted {gone_after:?}"
    );
    assert!(list.keys.contains_key("watcher"));
}

#[actix_web::test]
async fn presence_comes_back_after_redis_restarts_empty() {
    let mut redis = crate::helpers::PrivateRedis::start();
    let replicas = spawn_cluster(2, ClusterBus::Redis(redis.url())).await;
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let alice = a.register().await;
    let topic = format!("devices:{}", alice.id);
    let _phone = device_socket(a, &alice, "phone").await;
    let mut watcher = device_socket(b, &alice, "watcher").await;
    join(&mut watcher, &topic).await;
    let mut list = PresenceList::default();
    until(&mut watcher, &topic, &mut list, |l| {
        l.keys.contains_key("phone")
    })
    .await;

    // A restarted Redis keeps nothing: every replica writes its own devices again once its
    // bus is back, and the views are read again.
    redis.halt();
    redis.resume();
    let by_handle = format!("/now-playing/by-handle/{}", alice.handle);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The registry itself lists the phone again (not only the watcher's memory of it).
        let devices: Value = b
            .get_with_token("/devices/", &alice.access_token)
            .await
            .json()
            .await
            .unwrap_or_default();
        let online: Vec<&str> = devices["devices"]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter(|d| d["online"] == true)
                    .filter_map(|d| d["device_id"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        if online.contains(&"phone") && online.contains(&"watcher") {
            break;
        }
        assert!(Instant::now() < deadline, "devices not back: {devices}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.get(&by_handle).await.status(), 204);
    // And the watcher's list still shows the phone after every re-read has landed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while watcher
        .sees_within(Duration::from_millis(10), |f| is_presence_on(f, &topic))
        .await
    {
        let frame = watcher.next_matching(|f| is_presence_on(f, &topic)).await;
        list.apply(&frame);
    }
    assert!(list.keys.contains_key("phone"), "{list:?}");
}

/// Issue 10, item 10, from the review: turning sharing off then playing at once leaked the
/// new track to followers (1 round in 10: the change was applied only once a store read came
/// back). The change now travels with its value and applies in order.
#[actix_web::test]
async fn nothing_played_after_sharing_is_turned_off_reaches_a_follower() {
    // The embedded store, whose reads take longest, and two workers (the request and the
    // socket on different threads): the window the old code left open.
    let app = &TestApp::spawn_tuned(crate::helpers::Backend::Sqlite, |s| s.workers = Some(2)).await;
    let (alice, bob) = (app.register().await, app.register().await);
    let followed = post(
        app,
        &format!("/follows/{}", alice.id),
        &bob.access_token,
        None,
    )
    .await;
    assert_eq!(followed.status(), 201);
    let alice_topic = format!("devices:{}", alice.id);
    let mut alice_phone = device_socket(app, &alice, "alice-phone").await;
    let alice_ref = join(&mut alice_phone, &alice_topic).await;
    let (mut bob_laptop, bob_topic, mut list) = friends_seeing(app, &bob, &alice).await;
    let alice_key = alice.id.to_string();
    for round in 0..30 {
        let off = patch_preferences(app, &alice, json!({"share_listening": false})).await;
        assert_eq!(off.status(), 200);
        let secret = format!("secret-{round}");
        let pushed = alice_phone
            .push(
                Some(&alice_ref),
                &alice_topic,
                "now_playing",
                json!({"track_id": secret, "progress_ms": 0, "is_playing": true}),
            )
            .await;
        assert_eq!(alice_phone.reply_to(&pushed).await[4]["status"], "ok");
        // Everything Bob is sent for a while: Alice leaves, and nothing carries the secret.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(frame) = tokio::time::timeout_at(
            deadline,
            bob_laptop.next_matching(|f| is_presence_on(f, &bob_topic)),
        )
        .await
        {
            assert!(
                !frame[4].to_string().contains(&secret),
                "round {round}: {secret} reached the follower: {frame}"
            );
            list.apply(&frame);
        }
        assert!(
            !list.keys.contains_key(&alice_key),
            "round {round}: Alice still shown"
        );
        let on = patch_preferences(app, &alice, json!({"share_listening": true})).await;
        assert_eq!(on.status(), 200);
        until(&mut bob_laptop, &bob_topic, &mut list, |l| {
            l.keys.contains_key(&alice_key)
        })
        .await;
        assert!(
            list.metas(&alice_key)
                .iter()
                .all(|m| m["now_playing"]["track_id"] == secret),
            "round {round}: back with what plays now"
        );
    }
}

/// From the review: a change of sharing made while a replica has lost the bus may go unheard
/// there; a replica whose bus comes back reads every watched user's consent again, so its
/// followers stop seeing the user either way.
#[actix_web::test]
async fn a_sharing_change_made_while_the_bus_was_lost_reaches_followers_after_it() {
    let mut redis = crate::helpers::PrivateRedis::start();
    let replicas = spawn_cluster(2, ClusterBus::Redis(redis.url())).await;
    let [a, b] = &replicas[..] else {
        panic!("two replicas")
    };
    let (alice, bob) = (a.register().await, a.register().await);
    let followed = post(
        a,
        &format!("/follows/{}", alice.id),
        &bob.access_token,
        None,
    )
    .await;
    assert_eq!(followed.status(), 201);
    let mut alice_phone = device_socket(a, &alice, "alice-phone").await;
    join(&mut alice_phone, &format!("devices:{}", alice.id)).await;
    let (mut bob_laptop, bob_topic, mut list) = friends_seeing(b, &bob, &alice).await;
    let alice_key = alice.id.to_string();

    redis.halt();
    let started = Instant::now();
    while b.metric("segue_bus_lost_total").await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never lost the bus"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let off = patch_preferences(a, &alice, json!({"share_listening": false})).await;
    assert_eq!(
        off.status(),
        200,
        "the store took it; the news could not travel"
    );
    redis.resume();
    until(&mut bob_laptop, &bob_topic, &mut list, |l| {
        !l.keys.contains_key(&alice_key)
    })
    .await;
}
