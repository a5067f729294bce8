//! Catalogs that pass the checksum: the input is `[u32 LE data length][data][catalog JSON]`,
//! framed here with a correct preamble, footer and catalog checksum, so that the fuzzer spends
//! its time on catalog validation (offsets, shapes, dtypes, names, layouts) rather than on the
//! checksum that guards it.
#![no_main]

use std::path::Path;

use denselora_core::bundle::format::{checksum, preamble, Footer, FORMAT_VERSION, PREAMBLE_LEN};
use denselora_core::bundle::Bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let data_len = (u32::from_le_bytes(input[..4].try_into().unwrap()) as usize).min(input.len() - 4);
    let (data, catalog) = input[4..].split_at(data_len);
    let mut file = preamble(FORMAT_VERSION).to_vec();
    file.extend_from_slice(data);
    let footer = Footer {
        catalog_offset: PREAMBLE_LEN + data.len() as u64,
        catalog_len: catalog.len() as u64,
        catalog_xxh3: checksum(catalog),
    };
    file.extend_from_slice(catalog);
    file.extend_from_slice(&footer.to_bytes());
    if let Ok(bundle) = Bundle::from_bytes(Path::new("fuzz.dl"), file) {
        let names: Vec<String> = bundle.names().map(String::from).collect();
        for name in &names {
            if let Ok(tensors) = bundle.tensors(name, true) {
                for (entry, view) in tensors {
                    assert_eq!(view.data.len(), entry.length);
                    assert_eq!(view.data.as_ptr() as usize % 64, bundle.bytes().as_ptr() as usize % 64);
                }
            }
        }
        let _ = bundle.verify();
    }
});
