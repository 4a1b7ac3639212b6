//! The outbox's on-disk records, read back after damage: the write-ahead log (with and
//! without the mark's epochs as hints), the acknowledgement log and the mark. Whatever the
//! bytes, decoding must not panic, must stay inside the input, and a start's plan made from
//! what was decoded must not panic either.
#![no_main]

use id06d::storage::recovery::{Findings, LogFindings, LogRecord, SledFindings};
use id06d::storage::wal::PREALLOC;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let hint = data
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let scan = id06d::storage::wal::decode(data, &[hint]);
    assert!(scan.len <= data.len() || scan.records.is_empty());
    assert!(scan.dirty_to <= data.len().max(scan.len));
    let acks = id06d::storage::wal::decode_acks(data);
    assert!(acks.len() * 16 <= data.len());
    let (mark, _) = id06d::storage::mark::decode(data);
    let records = scan
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| LogRecord {
            offset: r.offset,
            first_pos: Some(i as u64 * 2 + 1),
            last_pos: i as u64 * 2 + 2,
        })
        .collect();
    let findings = Findings {
        mark,
        log: LogFindings {
            created: data.first() == Some(&0),
            found_len: PREALLOC,
            records,
            epoch: scan.epoch,
            skipped: scan.skipped.clone(),
            tail: scan.tail,
        },
        sled: SledFindings {
            empty: data.len() % 2 == 0,
            stream: None,
            last_pos: hint % 1000,
        },
        acks: acks.into_iter().collect(),
        acks_unreadable: None,
    };
    let _ = id06d::storage::recovery::plan(&findings);
});
