//! Store path and nix32 round trips: a base name `StorePath` accepts comes back unchanged
//! through every accessor and through the absolute form; a nix32 string `decode` accepts
//! encodes back to itself, and any bytes survive encode → decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use narflow::format::nix32;
use narflow::format::store_path::{HASH_PART_LEN, StorePath};

const STORE_DIR: &str = "/nix/store";

fuzz_target!(|data: &[u8]| {
    nix32_round_trip::<20>(data);
    nix32_round_trip::<32>(data);

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = StorePath::from_base_name(s) else {
        return;
    };
    assert_eq!(path.base_name(), s);
    assert_eq!(path.to_string(), s);
    assert_eq!(
        format!("{}-{}", path.hash_part(), path.name()),
        s,
        "hash part and name do not recombine"
    );

    // The hash part is 20 bytes in nix32; 160 bits fill 32 characters exactly, so every
    // valid hash part decodes, and back.
    assert_eq!(path.hash_part().len(), HASH_PART_LEN);
    let digest = nix32::decode::<20>(path.hash_part().as_bytes())
        .unwrap_or_else(|e| panic!("accepted store path {s:?} has an invalid hash part: {e}"));
    assert_eq!(nix32::encode(&digest), path.hash_part());

    let absolute = path.to_absolute(STORE_DIR);
    assert_eq!(absolute, format!("{STORE_DIR}/{s}"));
    assert_eq!(
        StorePath::from_absolute_path(&absolute, STORE_DIR),
        Ok(path.clone())
    );
    assert_eq!(
        StorePath::from_absolute_path(&format!("{absolute}/"), STORE_DIR),
        Ok(path.clone())
    );
    assert_eq!(
        StorePath::from_absolute_path_prefix(&absolute, STORE_DIR),
        Ok(path.clone())
    );
    assert_eq!(
        StorePath::from_absolute_path_prefix(&format!("{absolute}/bin/x"), STORE_DIR),
        Ok(path.clone())
    );
    assert!(
        StorePath::from_absolute_path(&format!("{absolute}/bin"), STORE_DIR).is_err(),
        "from_absolute_path accepted a path below a store path"
    );
});

/// For input of exactly `encoded_len(N)` characters: if it decodes, it encodes back to
/// itself (nix32 is canonical: non-zero padding bits are rejected). For input of at least
/// `N` bytes: the first `N` bytes survive encode → decode.
fn nix32_round_trip<const N: usize>(data: &[u8]) {
    let len = nix32::encoded_len(N);
    if data.len() == len {
        if let Ok(bytes) = nix32::decode::<N>(data) {
            assert_eq!(
                nix32::encode(&bytes).as_bytes(),
                data,
                "nix32 decode then encode changed the input"
            );
        }
    } else {
        assert!(
            nix32::decode::<N>(data).is_err(),
            "nix32::decode::<{N}> accepted {} characters",
            data.len()
        );
    }

    if let Some(bytes) = data.first_chunk::<N>() {
        let encoded = nix32::encode(bytes);
        assert_eq!(encoded.len(), len);
        assert_eq!(
            nix32::decode::<N>(encoded.as_bytes()).as_ref(),
            Ok(bytes),
            "nix32 encode then decode changed bytes"
        );
    }
}
