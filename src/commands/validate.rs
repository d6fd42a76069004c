//! `sluice validate PIPELINE`.

use std::path::Path;

use crate::exit;

/// Check the file and list its functions.
pub fn run(path: &Path) -> u8 {
    let p = match super::load_pipeline(path) {
        Ok(p) => p,
        Err(code) => return code,
    };
    println!("{}: ok, {} function(s)", path.display(), p.functions.len());
    for f in p.functions.values() {
        println!(
            "  {}: {} ({} MiB, timeout {:?}, concurrency {}, tenant {}, backend {:?})",
            f.name,
            f.path.display(),
            f.memory_mb,
            f.timeout,
            f.concurrency,
            f.tenant,
            f.backend
        );
    }
    exit::OK
}
