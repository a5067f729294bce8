//! Adapter records that pass their checksum: the input is `[u32 LE data length][data][record
//! JSON]`, framed here as a one-adapter bundle whose catalog points at the record with a correct
//! checksum, so that the fuzzer spends its time on record validation (tensor offsets, shapes,
//! dtypes, overlaps, the adapter layout) rather than on the checksums that guard it.
#![no_main]

use std::path::Path;

use denselora_core::bundle::format::{
    checksum, hash_hex, preamble, Catalog, Footer, IndexEntry, FORMAT_NAME, FORMAT_VERSION, PREAMBLE_LEN,
};
use denselora_core::bundle::Bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let data_len = (u32::from_le_bytes(input[..4].try_into().unwrap()) as usize).min(input.len() - 4);
    let (data, record) = input[4..].split_at(data_len);
    if record.is_empty() {
        return; // an empty record is refused by the catalog check, not what this target explores
    }
    let mut file = preamble(FORMAT_VERSION).to_vec();
    file.extend_from_slice(data);
    let record_offset = file.len() as u64;
    file.extend_from_slice(record);
    let catalog = Catalog {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        adapters: vec![IndexEntry {
            name: "a".into(),
            offset: record_offset,
            length: record.len() as u64,
            xxh3: hash_hex(checksum(record)),
        }],
    };
    let text = serde_json::to_vec(&catalog).unwrap();
    let footer = Footer {
        catalog_offset: PREAMBLE_LEN + (data.len() + record.len()) as u64,
        catalog_len: text.len() as u64,
        catalog_xxh3: checksum(&text),
    };
    file.extend_from_slice(&text);
    file.extend_from_slice(&footer.to_bytes());
    let bundle = Bundle::from_bytes(Path::new("fuzz.dl"), file).expect("a well-framed one-adapter bundle opens");
    if let Ok(tensors) = bundle.tensors("a", true) {
        for (entry, view) in tensors {
            assert_eq!(view.data.len(), entry.length);
        }
    }
    let _ = bundle.verify();
    let _ = bundle.stats();
});
