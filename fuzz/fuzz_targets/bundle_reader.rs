//! Any byte string handed to the bundle reader gives a bundle or a typed error: never a panic,
//! an out-of-bounds read, or a huge allocation. Valid-looking bundles are also fetched and verified.
#![no_main]

use std::path::Path;

use denselora_core::bundle::Bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = Bundle::from_bytes(Path::new("fuzz.dl"), data.to_vec()) {
        let names: Vec<String> = bundle.names().map(String::from).collect();
        for name in &names {
            if let Ok(tensors) = bundle.tensors(name, true) {
                for (entry, view) in tensors {
                    assert_eq!(view.data.len(), entry.length);
                }
            }
        }
        let _ = bundle.verify();
        let _ = bundle.stats();
    }
});
