//! The producer side of blocklist distribution, for a backend or an operator: publishing
//! updates and snapshots to the broker named in a configuration file, so a site can run
//! without any other software.

use crate::config::MqttSettings;
use crate::lists::signing::sha256_hex;
use id06_protocol::{
    CardStatus, CardUid, SnapshotChunk, SnapshotManifest, CARDS_PER_CHUNK, SNAPSHOT_SCHEMA,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::time::Duration;

/// One message to publish.
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

/// Builds the chunks and manifest of a snapshot (the manifest unsigned).
pub fn snapshot_messages(
    prefix_snapshot_topic: &str,
    version: u64,
    entries: &[(CardUid, CardStatus)],
) -> (SnapshotManifest, Vec<Message>) {
    let mut messages = Vec::new();
    let mut hashes = Vec::new();
    let chunks: Vec<&[(CardUid, CardStatus)]> = if entries.is_empty() {
        vec![&[]]
    } else {
        entries.chunks(CARDS_PER_CHUNK).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let bytes = SnapshotChunk::encode(version, i as u32, chunk);
        hashes.push(sha256_hex(&bytes));
        messages.push(Message {
            topic: format!("{prefix_snapshot_topic}/{i}"),
            payload: bytes,
            retain: true,
        });
    }
    let manifest = SnapshotManifest {
        schema: SNAPSHOT_SCHEMA.into(),
        version,
        cards: entries.len() as u64,
        chunks: chunks.len() as u32,
        chunk_sha256: hashes,
        signature: None,
    };
    (manifest, messages)
}

/// Publishes `messages` in order with QoS 1 and waits until the broker acknowledged each.
pub async fn publish_all(
    settings: &MqttSettings,
    password: Option<String>,
    messages: Vec<Message>,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), String> {
    let client_id = format!("id06d-publisher-{}", std::process::id());
    let mut o = MqttOptions::new(client_id, settings.host.clone(), settings.port);
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(16 << 20, 16 << 20);
    if let Some(user) = &settings.username {
        o.set_credentials(user.clone(), password.unwrap_or_default());
    }
    let total = messages.len();
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let sender = client.clone();
    let feeder = tokio::spawn(async move {
        for m in messages {
            if sender
                .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while acked < total {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .map_err(|_| {
                format!("the broker acknowledged only {acked} of {total} messages within 5 minutes")
            })?;
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                progress(acked, total);
            }
            Ok(_) => {}
            Err(e) => {
                feeder.abort();
                return Err(format!(
                    "cannot publish to the broker at {}: {e}",
                    settings.url
                ));
            }
        }
    }
    let _ = client.disconnect().await;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_split_into_chunks_with_a_matching_manifest() {
        let entries: Vec<_> = (0..(CARDS_PER_CHUNK as u32 + 10))
            .map(|n| {
                let uid =
                    CardUid::from_bytes(&[4, 1, 2, 3, (n >> 16) as u8, (n >> 8) as u8, n as u8])
                        .unwrap();
                (uid, CardStatus::Suspended)
            })
            .collect();
        let (m, msgs) = snapshot_messages("p/blocklist/snapshot", 12, &entries);
        assert_eq!(
            (m.version, m.cards, m.chunks),
            (12, entries.len() as u64, 2)
        );
        assert_eq!(msgs[1].topic, "p/blocklist/snapshot/1");
        assert!(msgs.iter().all(|m| m.retain));
        let mut back = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            assert!(m.names_chunk(i as u32, &sha256_hex(&msg.payload)));
            back.extend(SnapshotChunk::decode(&msg.payload).unwrap().entries);
        }
        assert_eq!(back, entries);
    }
}
