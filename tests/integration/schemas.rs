//! The integrator documents in `protocol/` against the real daemon: `asyncapi.yaml` must hold
//! together, every schema in `protocol/schemas/` must be a sound JSON Schema 2020-12 that
//! refuses broken payloads, and every message a real run publishes must match the schema
//! that `asyncapi.yaml` names for its topic.

use crate::support::*;
use id06_protocol::{
    CardStatus, CardUid, Decision, DenyReason, Direction, Event, EventSchema, SnapshotChunk,
    Topics, UtcMillis,
};
use id06d::config::WhenStale;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

const C1: &str = "04A10000000001"; // unlisted
const C2: &str = "04B10000000002"; // blocked
const C3: &str = "04B10000000003"; // suspended
const C4: &str = "04A10000000004"; // unlisted, toggles
const C5: &str = "04B10000000005"; // produced
const C6: &str = "04B10000000006"; // terminated

fn protocol_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// `protocol/asyncapi.yaml`, as JSON.
fn asyncapi() -> Value {
    let path = protocol_dir().join("asyncapi.yaml");
    let text = std::fs::read_to_string(&path).expect("protocol/asyncapi.yaml");
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("asyncapi.yaml is not YAML: {e}"))
}

/// The schema files, by file name.
fn schema_files() -> BTreeMap<String, Value> {
    let dir = protocol_dir().join("schemas");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("protocol/schemas/") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".schema.json"),
            "{name}: protocol/schemas/ holds only *.schema.json files"
        );
        files.insert(name, read_json(&path));
    }
    files
}

/// Every schema compiled (draft 2020-12, formats checked, nothing fetched), each with the
/// others registered so that their relative `$ref`s resolve as they do from the folder.
pub(crate) struct Schemas {
    validators: BTreeMap<String, jsonschema::Validator>,
}

impl Schemas {
    fn base_uri(name: &str) -> String {
        format!("file:///id06d/protocol/schemas/{name}")
    }

    pub(crate) fn load() -> Schemas {
        let files = schema_files();
        let registry = jsonschema::Registry::new()
            .extend(files.iter().map(|(name, v)| (Self::base_uri(name), v)))
            .expect("the schemas register")
            .prepare()
            .expect("the schemas' references resolve");
        let validators = files
            .iter()
            .map(|(name, schema)| {
                let validator = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .should_validate_formats(true)
                    .offline()
                    .with_registry(&registry)
                    .with_base_uri(Self::base_uri(name))
                    .build(schema)
                    .unwrap_or_else(|e| panic!("{name} does not compile: {e}"));
                (name.clone(), validator)
            })
            .collect();
        Schemas { validators }
    }

    /// What is wrong with `payload` according to `schema` (a file name).
    fn errors(&self, schema: &str, payload: &Value) -> Vec<String> {
        let v = self
            .validators
            .get(schema)
            .unwrap_or_else(|| panic!("no schema {schema} in protocol/schemas/"));
        v.iter_errors(payload)
            .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
            .collect()
    }

    fn assert_valid(&self, schema: &str, payload: &Value, what: &str) {
        let errors = self.errors(schema, payload);
        assert!(
            errors.is_empty(),
            "{what} does not match {schema}:\n{payload}\n{}",
            errors.join("\n")
        );
    }

    fn assert_invalid(&self, schema: &str, payload: &Value, what: &str) {
        assert!(
            !self.errors(schema, payload).is_empty(),
            "{schema} accepts {what}:\n{payload}"
        );
    }
}

/// A JSON pointer into `doc` (`#/a/b`), or panics naming the reference.
fn pointer<'a>(doc: &'a Value, fragment: &str, what: &str) -> &'a Value {
    let ptr = fragment.trim_start_matches('#');
    doc.pointer(ptr)
        .unwrap_or_else(|| panic!("{what}: {fragment} points at nothing"))
}

/// Follows a local `$ref` (`{"$ref": "#/…"}`) in the AsyncAPI document.
fn follow<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) if r.starts_with('#') => follow(doc, pointer(doc, r, "asyncapi.yaml")),
        _ => v,
    }
}

/// Every `$ref` string in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// One channel of `asyncapi.yaml` with what a test needs of it.
#[derive(Debug)]
struct Channel {
    id: String,
    address: String,
    /// `send` (the gateway publishes) or `receive` (it subscribes).
    action: String,
    qos: u64,
    retain: bool,
    content_type: String,
    /// The payload's schema file, for JSON payloads.
    schema: Option<String>,
}

impl Channel {
    /// Whether `topic` is this channel's address with `fixed` parameters filled in; any other
    /// `{parameter}` matches one topic level.
    fn matches(&self, topic: &str, fixed: &[(&str, &str)]) -> bool {
        let mut address = self.address.clone();
        for (name, value) in fixed {
            address = address.replace(&format!("{{{name}}}"), value);
        }
        let want: Vec<&str> = address.split('/').collect();
        let got: Vec<&str> = topic.split('/').collect();
        want.len() == got.len()
            && want
                .iter()
                .zip(&got)
                .all(|(w, g)| (w.starts_with('{') && w.ends_with('}') && !g.is_empty()) || w == g)
    }
}

fn channels(doc: &Value) -> Vec<Channel> {
    let operations = doc["operations"].as_object().expect("operations");
    let default_type = doc["defaultContentType"].as_str().unwrap_or("");
    doc["channels"]
        .as_object()
        .expect("channels")
        .iter()
        .map(|(id, ch)| {
            let reference = format!("#/channels/{id}");
            let ops: Vec<&Value> = operations
                .values()
                .filter(|o| o["channel"]["$ref"] == reference.as_str())
                .collect();
            assert_eq!(
                ops.len(),
                1,
                "channel {id}: one operation, not {}",
                ops.len()
            );
            let op = ops[0];
            let mqtt = &op["bindings"]["mqtt"];
            let messages = ch["messages"].as_object().expect("channel messages");
            assert_eq!(messages.len(), 1, "channel {id}: one message");
            let message = follow(doc, messages.values().next().unwrap());
            let content_type = message["contentType"]
                .as_str()
                .unwrap_or(default_type)
                .to_string();
            let schema = message["payload"]["$ref"].as_str().map(|r| {
                r.strip_prefix("./schemas/")
                    .unwrap_or_else(|| panic!("channel {id}: payload {r} is not in ./schemas/"))
                    .to_string()
            });
            Channel {
                id: id.clone(),
                address: ch["address"].as_str().expect("an address").to_string(),
                action: op["action"].as_str().expect("an action").to_string(),
                qos: mqtt["qos"].as_u64().expect("an MQTT qos binding"),
                retain: mqtt["retain"].as_bool().expect("an MQTT retain binding"),
                content_type,
                schema,
            }
        })
        .collect()
}

fn channel_for<'a>(channels: &'a [Channel], topic: &str, fixed: &[(&str, &str)]) -> &'a Channel {
    let found: Vec<&Channel> = channels
        .iter()
        .filter(|c| c.matches(topic, fixed))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "topic {topic} must be in exactly one channel of asyncapi.yaml, is in {found:?}"
    );
    found[0]
}

/// The parameters of the test configuration's topics.
fn fixed(config: &TestConfig) -> [(&str, &str); 3] {
    [
        ("topic_prefix", "id06/v1"),
        ("site_id", config.site.as_str()),
        ("terminal_id", config.terminal.as_str()),
    ]
}

/// Checks every received message against what `asyncapi.yaml` says of its topic (a JSON
/// payload against the schema it names, a snapshot chunk against the binary layout);
/// returns the payloads by channel (`null` for a binary chunk).
pub(crate) fn check_received(
    schemas: &Schemas,
    config: &TestConfig,
    received: &[Received],
) -> BTreeMap<String, Vec<Value>> {
    let doc = asyncapi();
    let channels = channels(&doc);
    let fixed = fixed(config);
    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (i, m) in received.iter().enumerate() {
        let ch = channel_for(&channels, &m.topic, &fixed);
        let what = format!("message {i} on {}", m.topic);
        match (ch.content_type.as_str(), &ch.schema) {
            ("application/json", Some(schema)) => {
                let v: Value = serde_json::from_slice(&m.payload)
                    .unwrap_or_else(|e| panic!("{what} is not JSON: {e}"));
                schemas.assert_valid(schema, &v, &what);
                seen.entry(ch.id.clone()).or_default().push(v);
            }
            ("application/octet-stream", None) => {
                assert!(m.payload.starts_with(b"ID6C"), "{what}: no ID6C magic");
                let chunk = SnapshotChunk::decode(&m.payload)
                    .unwrap_or_else(|e| panic!("{what} is not a snapshot chunk: {e}"));
                assert_eq!(
                    m.topic.rsplit('/').next(),
                    Some(chunk.index.to_string().as_str()),
                    "{what}: the topic names the chunk's index"
                );
                seen.entry(ch.id.clone()).or_default().push(Value::Null);
            }
            other => panic!("channel {}: unexpected content {other:?}", ch.id),
        }
    }
    seen
}

pub(crate) fn all_received(sub: &Subscriber) -> Vec<Received> {
    sub.messages.lock().unwrap().clone()
}

/// A reader section of the configuration.
fn reader(name: &str, script: &str, direction: &str) -> String {
    format!(
        "[[reader]]\nname = \"{name}\"\nkind = \"simulated\"\nscript = \"{script}\"\npoll_ms = 20\ndirection = \"{direction}\"\n\n"
    )
}

fn cli_ok(args: &[&str]) -> String {
    let (code, out, err) = id06d(args);
    assert_eq!(code, 0, "id06d {args:?} failed: {err}");
    out
}

fn reasons(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("granted").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The documents on their own.

#[test]
fn asyncapi_parses_and_every_reference_resolves() {
    let doc = asyncapi();
    assert!(
        doc["asyncapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "an AsyncAPI 3 document"
    );
    let files = schema_files();

    // Every $ref in the AsyncAPI document: local ones point at something, file ones name an
    // existing schema (and, with a fragment, something in it).
    let mut reached: BTreeSet<String> = BTreeSet::new();
    let mut pending: Vec<(String, String)> = Vec::new(); // (from, reference)
    let mut found = Vec::new();
    refs(&doc, &mut found);
    assert!(!found.is_empty());
    for r in found {
        if r.starts_with('#') {
            pointer(&doc, &r, "asyncapi.yaml");
        } else {
            pending.push(("asyncapi.yaml".into(), r));
        }
    }
    // Follow file references, also from schema to schema, relative to the referring file.
    while let Some((from, r)) = pending.pop() {
        let (file, fragment) = r.split_once('#').unwrap_or((r.as_str(), ""));
        let target = if file.is_empty() {
            from.clone()
        } else if from == "asyncapi.yaml" {
            let path = protocol_dir().join(file);
            assert!(path.is_file(), "asyncapi.yaml refers to {r}: no such file");
            file.strip_prefix("./schemas/")
                .unwrap_or_else(|| panic!("asyncapi.yaml refers to {r}, outside schemas/"))
                .to_string()
        } else {
            assert!(
                !file.contains('/'),
                "{from} refers to {r}: refer to schemas in the same folder"
            );
            file.to_string()
        };
        let schema = files
            .get(&target)
            .unwrap_or_else(|| panic!("{from} refers to {r}: no schemas/{target}"));
        if !fragment.is_empty() {
            pointer(schema, fragment, &format!("{from} → {r}"));
        }
        if reached.insert(target.clone()) {
            let mut inner = Vec::new();
            refs(schema, &mut inner);
            pending.extend(inner.into_iter().map(|x| (target.clone(), x)));
        }
    }
    let all: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(
        reached, all,
        "every schema file is used by asyncapi.yaml, directly or through another schema"
    );

    // Who sends what, with which QoS and retain flag: contract §7.
    let channels = channels(&doc);
    let table: BTreeMap<&str, (&str, bool, Option<&str>)> = [
        ("event", ("send", false, Some("event.schema.json"))),
        ("decision", ("send", false, Some("decision.schema.json"))),
        ("status", ("send", true, Some("status.schema.json"))),
        ("reader", ("send", true, Some("reader.schema.json"))),
        (
            "blocklistUpdate",
            ("receive", false, Some("blocklist-update.schema.json")),
        ),
        (
            "blocklistSnapshot",
            (
                "receive",
                true,
                Some("blocklist-snapshot-manifest.schema.json"),
            ),
        ),
        ("blocklistSnapshotChunk", ("receive", true, None)),
        ("ack", ("receive", false, Some("ack.schema.json"))),
        ("replay", ("receive", false, Some("replay.schema.json"))),
        (
            "replayResult",
            ("send", false, Some("replay-result.schema.json")),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        channels
            .iter()
            .map(|c| c.id.as_str())
            .collect::<BTreeSet<_>>(),
        table.keys().copied().collect::<BTreeSet<_>>()
    );
    for c in &channels {
        let (action, retain, schema) = table[c.id.as_str()];
        assert_eq!(c.action, action, "channel {}", c.id);
        assert_eq!(c.qos, 1, "channel {}: QoS 1 everywhere", c.id);
        assert_eq!(c.retain, retain, "channel {}: retained", c.id);
        assert_eq!(c.schema.as_deref(), schema, "channel {}", c.id);
    }

    // The topics the daemon builds are the addresses the document gives.
    let t = Topics::new("id06/v1", "SE-0001", "gate-north-1");
    let fixed = [
        ("topic_prefix", "id06/v1"),
        ("site_id", "SE-0001"),
        ("terminal_id", "gate-north-1"),
    ];
    for (topic, id) in [
        (t.event(), "event"),
        (t.decision(), "decision"),
        (t.status(), "status"),
        (t.reader("entry"), "reader"),
        (t.blocklist_update(), "blocklistUpdate"),
        (t.blocklist_snapshot(), "blocklistSnapshot"),
        (
            format!("{}/0", t.blocklist_snapshot()),
            "blocklistSnapshotChunk",
        ),
        (t.ack(), "ack"),
        (t.replay(), "replay"),
        (t.replay_result(), "replayResult"),
    ] {
        assert_eq!(channel_for(&channels, &topic, &fixed).id, id, "{topic}");
    }

    // The last will is the offline status.
    let will = &doc["servers"]["site-broker"]["bindings"]["mqtt"]["lastWill"];
    assert_eq!(
        will["topic"].as_str(),
        Some("{topic_prefix}/{site_id}/{terminal_id}/status")
    );
    assert_eq!(
        serde_json::from_str::<Value>(will["message"].as_str().expect("a will message")).unwrap(),
        serde_json::from_slice::<Value>(&id06_protocol::GatewayStatus::offline_payload()).unwrap()
    );
}

#[test]
fn the_schemas_are_sound_and_their_examples_and_the_asyncapi_examples_match() {
    let schemas = Schemas::load();
    for (name, schema) in schema_files() {
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("{name} is not a valid JSON Schema: {e}");
        }
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        for (i, example) in schema["examples"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            schemas.assert_valid(&name, example, &format!("{name} example {i}"));
        }
    }
    let doc = asyncapi();
    let mut checked = 0;
    for (id, message) in doc["components"]["messages"].as_object().expect("messages") {
        let Some(r) = message["payload"]["$ref"].as_str() else {
            continue;
        };
        let schema = r.trim_start_matches("./schemas/");
        for example in message["examples"].as_array().expect("examples") {
            let what = format!("asyncapi.yaml example {id}/{}", example["name"]);
            schemas.assert_valid(schema, &example["payload"], &what);
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} examples");
}

const STREAM: &str = "0f9c2b7e-5d41-4c8a-9e3b-2a6d1f0c7b95";

/// A full event as the daemon would write it, as JSON.
fn sample_event(
    status: CardStatus,
    decision: Decision,
    reason: Option<DenyReason>,
    stale: bool,
) -> Value {
    let stream: id06_protocol::StreamId = STREAM.parse().unwrap();
    let id = Event::event_id_for("SE-0001", "gate-north-1", &stream, 7);
    let e = Event {
        schema: EventSchema,
        event_id: id.clone(),
        stream,
        seq: 7,
        decision_id: id,
        site_id: "SE-0001".into(),
        terminal_id: "gate-north-1".into(),
        reader: "entry".into(),
        direction: Direction::Out,
        card_uid: CardUid::parse(C1).unwrap(),
        card_status: status,
        decision,
        reason,
        blocklist_version: 3,
        blocklist_stale: stale,
        occurred_at: UtcMillis::parse("2026-11-22T06:58:03.120Z").unwrap(),
        clock_synced: false,
    };
    serde_json::from_slice(&e.to_json()).unwrap()
}

#[test]
fn the_event_schema_allows_exactly_the_rulings_the_daemon_makes() {
    let schemas = Schemas::load();
    // Every ruling the decision function can make.
    let mut possible = std::collections::HashSet::new();
    for listed in [None]
        .into_iter()
        .chain(CardStatus::ALL.iter().copied().map(Some))
    {
        for stale in [false, true] {
            for when in [WhenStale::Allow, WhenStale::Deny] {
                use id06d::config::AccessMode;
                use id06d::lists::site_list::SiteEntry;
                for site in [None, Some(SiteEntry::Ban), Some(SiteEntry::Allow)] {
                    for mode in [AccessMode::Open, AccessMode::SiteList] {
                        let r = id06d::tap::decide::decide_at_site(listed, site, mode, stale, when);
                        let v = sample_event(r.card_status, r.decision, r.reason, stale);
                        schemas.assert_valid("event.schema.json", &v, "a ruling of decide()");
                        schemas.assert_valid("decision.schema.json", &v, "a ruling of decide()");
                        possible.insert((r.card_status, r.decision, r.reason, stale));
                    }
                }
            }
        }
    }
    // Every other combination of status, decision, reason and staleness is refused.
    let mut refused = 0;
    for status in CardStatus::ALL {
        for decision in [Decision::Granted, Decision::Denied] {
            for reason in [None]
                .into_iter()
                .chain(DenyReason::ALL.iter().copied().map(Some))
            {
                for stale in [false, true] {
                    if possible.contains(&(status, decision, reason, stale)) {
                        continue;
                    }
                    let v = sample_event(status, decision, reason, stale);
                    schemas.assert_invalid(
                        "event.schema.json",
                        &v,
                        &format!("{status} {decision:?} {reason:?} stale={stale}"),
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 100, "{refused}");
}

/// `base` with the fields of `patch` set.
fn patched(base: &Value, patch: Value) -> Value {
    let mut v = base.clone();
    for (k, x) in patch.as_object().expect("a patch object") {
        v[k] = x.clone();
    }
    v
}

/// `base` without `field`.
fn without(base: &Value, field: &str) -> Value {
    let mut v = base.clone();
    v.as_object_mut().expect("an object").remove(field);
    v
}

#[test]
fn the_schemas_refuse_broken_payloads() {
    let s = Schemas::load();
    let reason = Some(DenyReason::Blocked);
    let e = sample_event(CardStatus::Blocked, Decision::Denied, reason, false);
    s.assert_valid("event.schema.json", &e, "the sample event");
    #[rustfmt::skip]
    let cases = [
        ("a missing field", without(&e, "clock_synced")),
        ("a missing reason", without(&e, "reason")),
        ("an unknown field", patched(&e, json!({"name": "Anna"}))),
        ("another schema", patched(&e, json!({"schema": "id06d/event/v1"}))),
        ("a v1 event id", patched(&e, json!({"event_id": "gate-north-1:7"}))),
        ("no stream", without(&e, "stream")),
        ("a stream that is no UUID", patched(&e, json!({"stream": "gate-north-1"}))),
        ("an upper-case stream", patched(&e, json!({"stream": "0F9C2B7E-5D41-4C8A-9E3B-2A6D1F0C7B95"}))),
        ("no decision_id", without(&e, "decision_id")),
        ("a decision_id that is no id", patched(&e, json!({"decision_id": "door"}))),
        ("a wrong direction", patched(&e, json!({"direction": "sideways"}))),
        ("an unknown reason", patched(&e, json!({"reason": "lost"}))),
        ("an unknown status", patched(&e, json!({"card_status": "stolen"}))),
        ("a lower-case UID", patched(&e, json!({"card_uid": "04b10000000002"}))),
        ("a UID with separators", patched(&e, json!({"card_uid": "04:B1:00:00:00:00:02"}))),
        ("a 5-byte UID", patched(&e, json!({"card_uid": "04B1000000"}))),
        ("no milliseconds", patched(&e, json!({"occurred_at": "2026-11-22T06:58:03Z"}))),
        ("an offset", patched(&e, json!({"occurred_at": "2026-11-22T07:58:03.120+01:00"}))),
        ("an impossible date", patched(&e, json!({"occurred_at": "2026-02-30T06:58:03.120Z"}))),
        ("seq 0 on P/event", patched(&e, json!({"seq": 0, "event_id": format!("SE-0001:gate-north-1:{STREAM}:0")}))),
        ("a negative seq", patched(&e, json!({"seq": -7}))),
        ("a seq as a string", patched(&e, json!({"seq": "7"}))),
        ("an event_id without seq", patched(&e, json!({"event_id": format!("SE-0001:gate-north-1:{STREAM}")}))),
        ("a blocked card granted", patched(&e, json!({"decision": "granted", "reason": null}))),
        ("a denial without a reason", patched(&e, json!({"reason": null}))),
        ("the wrong reason", patched(&e, json!({"reason": "suspended"}))),
        ("a reader name with a slash", patched(&e, json!({"reader": "a/b"}))),
        ("a terminal id with a colon", patched(&e, json!({"terminal_id": "gate:1"}))),
        ("a version as a float", patched(&e, json!({"blocklist_version": 3.5}))),
    ];
    for (what, v) in cases {
        s.assert_invalid("event.schema.json", &v, what);
        s.assert_invalid("decision.schema.json", &v, what);
    }
    // P/decision: seq 0 only with an unstored id, and an unstored id only with seq 0.
    let un = format!("SE-0001:gate-north-1:{STREAM}:unstored-3f1a9c0b5e7d2468");
    let unstored = patched(&e, json!({"seq": 0, "event_id": un, "decision_id": un}));
    s.assert_valid("decision.schema.json", &unstored, "an unstored decision");
    s.assert_invalid("event.schema.json", &unstored, "an unstored tap on P/event");
    let seq_unstored = patched(&e, json!({"event_id": un}));
    s.assert_invalid(
        "decision.schema.json",
        &seq_unstored,
        "an unstored id with a seq",
    );
    let short = patched(&e, json!({"seq": 0, "event_id": "gate-north-1:unstored"}));
    s.assert_invalid("decision.schema.json", &short, "the v1 unstored id");
    // The event stored after an unstored decision names it.
    let late = patched(&e, json!({"decision_id": un}));
    s.assert_valid("event.schema.json", &late, "an event stored late");

    let st = json!({"online": true, "version": "0.1.0", "started_at": "2026-11-22T05:00:00.512Z",
        "stream": STREAM, "last_seq": 12, "blocklist_version": 4, "blocklist_age_s": null, "outbox_depth": 0, "clock_synced": true,
        "blocklist_stale": true});
    s.assert_valid("status.schema.json", &st, "the sample status");
    #[rustfmt::skip]
    let cases = [
        ("a missing outbox_depth", without(&st, "outbox_depth")),
        ("a missing stream", without(&st, "stream")),
        ("a missing last_seq", without(&st, "last_seq")),
        ("an unknown field", patched(&st, json!({"uptime_s": 5}))),
        ("a negative age", patched(&st, json!({"blocklist_age_s": -1}))),
        ("a gap of three versions", patched(&st, json!({"blocklist_gap": [1, 2, 3]}))),
        ("an empty storage error", patched(&st, json!({"storage_error": ""}))),
        ("online false with details", patched(&st, json!({"online": false}))),
        ("a started_at that is no time", patched(&st, json!({"started_at": "yesterday"}))),
        ("the offline payload with a field", json!({"online": false, "version": "0.1.0"})),
        ("online as a string", json!({"online": "false"})),
        ("an empty object", json!({})),
    ];
    for (what, v) in cases {
        s.assert_invalid("status.schema.json", &v, what);
    }

    let r =
        json!({"state": "recovering", "hint": null, "last_error": "no answer", "recoveries": 2});
    s.assert_valid("reader.schema.json", &r, "the sample reader state");
    #[rustfmt::skip]
    let cases = [
        ("an unknown state", patched(&r, json!({"state": "broken"}))),
        ("an unknown hint", patched(&r, json!({"hint": "wave"}))),
        ("a missing hint", without(&r, "hint")),
        ("a missing recoveries", without(&r, "recoveries")),
        ("negative recoveries", patched(&r, json!({"recoveries": -1}))),
        ("an unknown field", patched(&r, json!({"temperature": 40}))),
    ];
    for (what, v) in cases {
        s.assert_invalid("reader.schema.json", &v, what);
    }

    let u = json!({"schema": "id06d/blocklist-update/v1", "from_version": 1, "to_version": 2,
        "set": [{"card_uid": C2, "status": "blocked"}], "clear": [C3]});
    s.assert_valid("blocklist-update.schema.json", &u, "the sample update");
    #[rustfmt::skip]
    let cases = [
        ("setting unlisted", patched(&u, json!({"set": [{"card_uid": C2, "status": "unlisted"}]}))),
        ("a set entry without status", patched(&u, json!({"set": [{"card_uid": C2}]}))),
        ("a card cleared twice", patched(&u, json!({"clear": [C3, C3]}))),
        ("a missing to_version", without(&u, "to_version")),
        ("a signature that is no Ed25519", patched(&u, json!({"signature": "c2ln"}))),
        ("an unknown field", patched(&u, json!({"note": "x"}))),
        ("another schema", patched(&u, json!({"schema": "id06d/event/v1"}))),
    ];
    for (what, v) in cases {
        s.assert_invalid("blocklist-update.schema.json", &v, what);
    }

    let m = json!({"schema": "id06d/blocklist-snapshot/v2", "version": 3, "cards": 10,
        "chunks": 1, "chunk_sha256": ["00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"]});
    let manifest = "blocklist-snapshot-manifest.schema.json";
    s.assert_valid(manifest, &m, "the sample manifest");
    #[rustfmt::skip]
    let cases = [
        ("no chunks", patched(&m, json!({"chunks": 0}))),
        ("too many chunks", patched(&m, json!({"chunks": 1001}))),
        ("a short hash", patched(&m, json!({"chunk_sha256": ["0011"]}))),
        ("no hashes", patched(&m, json!({"chunk_sha256": []}))),
        ("the v1 hash", patched(&m, json!({"sha256": "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"}))),
        ("the v1 schema", patched(&m, json!({"schema": "id06d/blocklist-snapshot/v1"}))),
        ("a missing cards", without(&m, "cards")),
    ];
    for (what, v) in cases {
        s.assert_invalid(manifest, &v, what);
    }
}

// ---------------------------------------------------------------------------------------
// Real runs.

fn rush(dir: &Path, url: &str, extra: &str) -> TestConfig {
    write_script(
        dir,
        "entry.txt",
        &format!("at 1000 present {C1}\nat 1300 absent\nat 1700 present {C2}\nat 1900 absent\n"),
    );
    // A suspended, a never activated and a terminated card; then the reader stops answering
    // for three seconds and comes back; then a granted tap out.
    write_script(
        dir,
        "exit.txt",
        &format!(
            "at 1200 present {C3}\nat 1400 absent\nat 1900 present {C5}\nat 2100 absent\n\
             at 2400 present {C6}\nat 2600 absent\nat 3000 fault\nat 6000 recover\n\
             at 6400 present {C1}\nat 6600 absent\n"
        ),
    );
    // A card that cannot be read for a while (the hold_steady hint), then read: in; later out.
    write_script(
        dir,
        "turnstile.txt",
        &format!(
            "at 2500 partial\nat 5500 present {C4}\nat 5700 absent\nat 6600 present {C4}\nat 6800 absent\n"
        ),
    );
    let readers = [
        reader("entry", "entry.txt", "in"),
        reader("exit", "exit.txt", "out"),
        reader("turnstile", "turnstile.txt", "toggle"),
    ]
    .concat();
    TestConfig::write(
        dir,
        url,
        &format!("{readers}[debounce]\ngone_ms = 200\nrepeat_ms = 800\n\n{extra}"),
    )
}

#[test]
fn every_payload_of_a_real_run_matches_its_schema() {
    let schemas = Schemas::load();
    let dir = scratch();
    let broker = broker(dir.path());
    let secret = dir.path().join("backend.key");
    let out = cli_ok(&[
        "blocklist",
        "keygen",
        "--secret-out",
        secret.to_str().unwrap(),
    ]);
    let public = out
        .lines()
        .find(|l| l.starts_with("public_key"))
        .expect("a public_key line");
    let config = rush(
        dir.path(),
        &broker.url(),
        &format!("[blocklist]\n{public}\n"),
    );
    let cfg = config.path.to_str().unwrap().to_string();
    let key = secret.to_str().unwrap().to_string();
    let csv = dir.path().join("list.csv");
    std::fs::write(
        &csv,
        format!("uid,status\n{C2},blocked\n{C3},suspended\n{C5},produced\n{C6},terminated\n"),
    )
    .unwrap();
    let csv = csv.to_str().unwrap().to_string();
    // The first list comes in before keys are in use (with a public_key, a local import is
    // refused: the backend owns the versions).
    let keyless = dir.path().join("keyless.toml");
    std::fs::write(
        &keyless,
        std::fs::read_to_string(&config.path)
            .unwrap()
            .replace(public, ""),
    )
    .unwrap();
    cli_ok(&[
        "blocklist",
        "import",
        &csv,
        "--version",
        "42",
        "--config",
        keyless.to_str().unwrap(),
    ]);
    let p = config.base();
    let sub = Subscriber::start(
        broker.port,
        "ledger-schemas",
        &[&format!("{p}/#"), "id06/v1/blocklist/#"],
    );
    let mut daemon = Daemon::start(&config);

    // Taps: granted, and denied for each reason a fresh list gives. (The readers start
    // after a second, so that the daemon is normally connected by then: a decision is not
    // kept for a broker the daemon has not reached yet.)
    wait_for("8 events", Duration::from_secs(30), || {
        sub.on(&format!("{p}/event")).len() >= 8
    });
    // The readers' states went through waving and a recovery.
    let reader_states = |name: &str| sub.json_on(&format!("{p}/reader/{name}"));
    wait_for("the exit reader recovered", Duration::from_secs(20), || {
        let states = reader_states("exit");
        states.iter().any(|s| s["state"] == "recovering")
            && states
                .last()
                .is_some_and(|s| s["state"] == "ok" && s["recoveries"] == 1)
    });
    assert!(
        reader_states("turnstile")
            .iter()
            .any(|s| s["hint"] == "hold_steady"),
        "the turnstile showed hold_steady: {:?}",
        reader_states("turnstile")
    );

    // The backend's side: a signed update, an update ahead of the list (a gap), and a signed
    // snapshot that closes it, all published by the id06d producer commands.
    let update = |name: &str, from: u64, to: u64| {
        let path = dir.path().join(name);
        let u = json!({"schema": "id06d/blocklist-update/v1", "from_version": from,
            "to_version": to, "set": [{"card_uid": C1, "status": "blocked"}], "clear": [C3]});
        std::fs::write(&path, u.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let status = || sub.last_json(&format!("{p}/status")).unwrap_or(Value::Null);
    let u1 = update("u1.json", 42, 43);
    cli_ok(&[
        "blocklist",
        "publish-update",
        &u1,
        "--key",
        &key,
        "--config",
        &cfg,
    ]);
    wait_for("version 43 in the status", Duration::from_secs(10), || {
        status()["blocklist_version"] == 43
    });
    let gap = update("gap.json", 50, 51);
    cli_ok(&[
        "blocklist",
        "publish-update",
        &gap,
        "--key",
        &key,
        "--config",
        &cfg,
    ]);
    wait_for("the gap in the status", Duration::from_secs(10), || {
        status()["blocklist_gap"] == json!([43, 50])
    });
    cli_ok(&[
        "blocklist",
        "publish-snapshot",
        &csv,
        "--version",
        "60",
        "--key",
        &key,
        "--config",
        &cfg,
    ]);
    wait_for("the snapshot in force", Duration::from_secs(10), || {
        let s = status();
        s["blocklist_version"] == 60 && s.get("blocklist_gap").is_none()
    });

    // A clean stop says offline.
    assert_eq!(daemon.terminate(), Some(0));
    wait_for("the offline status", Duration::from_secs(10), || {
        status() == json!({"online": false})
    });

    let seen = check_received(&schemas, &config, &all_received(&sub));
    let count = |id: &str| seen.get(id).map_or(0, Vec::len);
    let seqs: BTreeSet<u64> = seen["event"]
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!(seqs, (1..=8).collect(), "{:?}", seen["event"]);
    assert!(count("decision") >= 1, "decisions");
    for d in &seen["decision"] {
        assert_eq!(
            Some(d),
            seen["event"].iter().find(|e| e["seq"] == d["seq"]),
            "a decision is its event"
        );
    }
    assert_eq!(
        reasons(&seen["event"]),
        [
            "granted",
            "blocked",
            "suspended",
            "not_activated",
            "terminated"
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        "granted taps and every reason a fresh list gives"
    );
    let directions: BTreeSet<&str> = seen["event"]
        .iter()
        .filter_map(|e| e["direction"].as_str())
        .collect();
    assert_eq!(directions, BTreeSet::from(["in", "out"]));
    assert!(count("status") >= 4, "{:?}", seen.get("status"));
    assert!(count("reader") >= 6, "{:?}", seen.get("reader"));
    assert_eq!(count("blocklistUpdate"), 2);
    assert_eq!(count("blocklistSnapshot"), 1);
    assert_eq!(count("blocklistSnapshotChunk"), 1);
    assert!(
        seen["blocklistUpdate"]
            .iter()
            .chain(&seen["blocklistSnapshot"])
            .all(|v| v["signature"].is_string()),
        "the producer signed what it published"
    );

    // What stays on the broker is exactly what asyncapi.yaml calls retained.
    let late = Subscriber::start(
        broker.port,
        "late-schemas",
        &[&format!("{p}/#"), "id06/v1/blocklist/#"],
    );
    let retained_topics = || -> BTreeSet<String> {
        all_received(&late)
            .into_iter()
            .filter(|m| m.retain)
            .map(|m| m.topic)
            .collect()
    };
    let expected: BTreeSet<String> = [
        format!("{p}/status"),
        format!("{p}/reader/entry"),
        format!("{p}/reader/exit"),
        format!("{p}/reader/turnstile"),
        "id06/v1/blocklist/snapshot".to_string(),
        "id06/v1/blocklist/snapshot/0".to_string(),
    ]
    .into_iter()
    .collect();
    wait_for("the retained messages", Duration::from_secs(10), || {
        retained_topics() == expected
    });
    let doc = asyncapi();
    let channels = channels(&doc);
    let fixed = fixed(&config);
    for m in all_received(&late) {
        let ch = channel_for(&channels, &m.topic, &fixed);
        assert!(
            ch.retain,
            "{} is retained on the broker but asyncapi.yaml says channel {} is not",
            m.topic, ch.id
        );
    }
    check_received(&schemas, &config, &all_received(&late));
}

#[test]
fn a_stale_list_that_denies_gives_payloads_the_schemas_know() {
    let schemas = Schemas::load();
    let dir = scratch();
    let broker = broker(dir.path());
    write_script(
        dir.path(),
        "gate.txt",
        &format!("at 1000 present {C1}\nat 1200 absent\n"),
    );
    // No list was ever loaded: it is stale, and this gateway denies when it is. A second
    // reader is not plugged in.
    let missing = dir.path().join("ttyACM-missing");
    let config = TestConfig::write(
        dir.path(),
        &broker.url(),
        &format!(
            "{}[[reader]]\nname = \"side\"\nkind = \"line\"\npath = \"{}\"\nbaud = 9600\ndirection = \"in\"\n\n[blocklist]\nwhen_stale = \"deny\"\n",
            reader("gate", "gate.txt", "in"),
            missing.display()
        ),
    );
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-stale", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    wait_for("the denied tap", Duration::from_secs(20), || {
        !sub.on(&format!("{p}/event")).is_empty()
    });
    wait_for(
        "the missing reader's state",
        Duration::from_secs(20),
        || {
            sub.json_on(&format!("{p}/reader/side"))
                .iter()
                .any(|r| r["state"] == "absent" && r["last_error"].is_string())
        },
    );
    assert_eq!(daemon.terminate(), Some(0));
    wait_for("the offline status", Duration::from_secs(10), || {
        sub.last_json(&format!("{p}/status")) == Some(json!({"online": false}))
    });
    let seen = check_received(&schemas, &config, &all_received(&sub));
    let e = &seen["event"][0];
    assert_eq!(
        (&e["decision"], &e["reason"], &e["blocklist_stale"]),
        (&json!("denied"), &json!("blocklist_stale"), &json!(true))
    );
    assert!(
        seen["status"]
            .iter()
            .any(|s| s["blocklist_stale"] == true && s["blocklist_age_s"].is_null()),
        "{:?}",
        seen["status"]
    );
}

#[test]
fn payloads_while_the_disk_is_full_match_the_schemas() {
    let schemas = Schemas::load();
    let dir = scratch();
    let broker = broker(dir.path());
    let disk = Tmpfs::mount(dir.path(), "disk", "size=48m");
    let mut script = String::new();
    for i in 0..600u32 {
        script.push_str(&format!("at {} present {}\n", i * 100, card(7_000_000 + i)));
    }
    write_script(dir.path(), "stream.txt", &script);
    let config = TestConfig::write(dir.path(), &broker.url(), &reader("r", "stream.txt", "in"));
    let text = std::fs::read_to_string(&config.path).unwrap().replace(
        "data_dir = \"data\"",
        &format!("data_dir = \"{}/data\"", disk.path.display()),
    );
    std::fs::write(&config.path, text).unwrap();
    let p = config.base();
    let sub = Subscriber::start(broker.port, "ledger-full", &[&format!("{p}/#")]);
    let mut daemon = Daemon::start(&config);
    wait_for(
        "taps before the disk fills",
        Duration::from_secs(20),
        || sub.on(&format!("{p}/event")).len() >= 3,
    );
    let filler = fill_disk(&disk.path, 2 << 20);
    let unstored = |sub: &Subscriber| {
        sub.json_on(&format!("{p}/decision"))
            .iter()
            .filter(|d| d["seq"] == 0)
            .count()
    };
    wait_for(
        "the storage error and unstored decisions",
        Duration::from_secs(20),
        || {
            unstored(&sub) >= 3
                && sub
                    .json_on(&format!("{p}/status"))
                    .iter()
                    .any(|s| s.get("storage_error").is_some())
        },
    );
    // It dies before space returns: the next run reports the loss.
    daemon.kill9();
    std::fs::remove_file(&filler).unwrap();
    let mut daemon = Daemon::start(&config);
    wait_for("the loss on P/status", Duration::from_secs(20), || {
        sub.last_json(&format!("{p}/status"))
            .is_some_and(|s| s.get("storage_loss").is_some())
    });
    assert_eq!(daemon.terminate(), Some(0));
    let seen = check_received(&schemas, &config, &all_received(&sub));
    // Every unstored decision has an id of its own, and the event stored later names it.
    let unstored_ids: Vec<&str> = seen["decision"]
        .iter()
        .filter(|d| d["seq"] == 0)
        .filter_map(|d| d["event_id"].as_str())
        .collect();
    assert!(unstored_ids.len() >= 3, "{unstored_ids:?}");
    assert_eq!(
        unstored_ids.iter().collect::<BTreeSet<_>>().len(),
        unstored_ids.len(),
        "unstored decisions never share an id: {unstored_ids:?}"
    );
    assert!(unstored_ids.iter().all(|id| id.contains(":unstored-")));
    assert!(seen["status"]
        .iter()
        .any(|s| s.get("storage_error").is_some()));
    assert!(seen["status"]
        .iter()
        .any(|s| s.get("storage_loss").is_some()));
    drop(disk);
}
