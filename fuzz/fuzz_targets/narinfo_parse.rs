//! narinfo round trip: whatever `NarInfo::parse` accepts must render to text that parses
//! back to the same value, and rendering must be a fixed point (render ∘ parse ∘ render ==
//! render), so narinfos narflow rewrites never drift.
#![no_main]

use libfuzzer_sys::fuzz_target;
use narflow::format::narinfo::NarInfo;

const STORE_DIR: &str = "/nix/store";

fuzz_target!(|data: &[u8]| {
    // narinfo is text; parse takes &str, so non-UTF-8 input is out of scope.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = NarInfo::parse(text, STORE_DIR) else {
        return;
    };

    let rendered = info.render(STORE_DIR);
    let reparsed = NarInfo::parse(&rendered, STORE_DIR).unwrap_or_else(|e| {
        panic!("rendered narinfo does not parse: {e}\n--- rendered:\n{rendered}")
    });
    assert_eq!(
        reparsed, info,
        "parse(render(info)) != info\n--- rendered:\n{rendered}"
    );
    assert_eq!(
        reparsed.render(STORE_DIR),
        rendered,
        "render is not idempotent"
    );

    // The signed fingerprint is built from parsed fields only; it must not panic and must
    // name the full store path.
    let fingerprint = info.fingerprint(STORE_DIR);
    let prefix = format!("1;{};", info.store_path.to_absolute(STORE_DIR));
    assert!(
        fingerprint.starts_with(&prefix),
        "fingerprint {fingerprint:?} does not start with {prefix:?}"
    );
});
