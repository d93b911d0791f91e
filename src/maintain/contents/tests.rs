//! The check of one NAR: clean in each compression, and each kind of damage named.
use super::*;
use crate::format::nar::Node;
use crate::format::nar::listing::list_node;
use crate::format::nar::writer::write_node;
use std::collections::BTreeMap;
use std::io::Write;

fn tree() -> Node {
    let file = |executable, contents: &[u8]| Node::Regular {
        executable,
        contents: contents.to_vec(),
    };
    Node::Directory(BTreeMap::from([
        (
            b"bin".to_vec(),
            Node::Directory(BTreeMap::from([(
                b"hello".to_vec(),
                file(true, b"#!/bin/sh\necho hello\n"),
            )])),
        ),
        (b"data".to_vec(), file(false, &[7; 100_000])),
        (
            b"link".to_vec(),
            Node::Symlink {
                target: b"data".to_vec(),
            },
        ),
    ]))
}

fn nar() -> Vec<u8> {
    let mut nar = Vec::new();
    write_node(&tree(), &mut nar).unwrap();
    nar
}

/// `nar` compressed as narflow writes it: zstd as two independent frames, xz as two
/// streams.
fn compress(nar: &[u8], compression: &str) -> Vec<u8> {
    let (a, b) = nar.split_at(nar.len() / 2);
    match compression {
        "zstd" => [
            zstd::encode_all(a, 3).unwrap(),
            zstd::encode_all(b, 3).unwrap(),
        ]
        .concat(),
        "xz" => {
            let xz = |part: &[u8]| {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(part).unwrap();
                e.finish().unwrap()
            };
            [xz(a), xz(b)].concat()
        }
        _ => nar.to_vec(),
    }
}

fn expected(nar: &[u8], file: &[u8], compression: &str) -> Expected {
    Expected {
        compression: compression.into(),
        file_hash: Some(Sha256::digest(file)),
        nar_hash: Sha256::digest(nar),
        nar_size: nar.len() as u64,
    }
}

fn check(file: &[u8], want: &Expected, listing: Option<&[u8]>) -> Checked {
    check_nar(&mut &file[..], want, listing, &|_| {}).unwrap()
}

fn kinds(c: &Checked) -> Vec<Kind> {
    c.problems.iter().map(|(k, _)| *k).collect()
}

#[test]
fn a_sound_nar_is_clean_in_every_compression_with_its_listing() {
    let nar = nar();
    let listing = list_node(&tree());
    for compression in ["zstd", "xz", "none"] {
        let file = compress(&nar, compression);
        let want = expected(&nar, &file, compression);
        let c = check(&file, &want, None);
        assert_eq!(c.problems, vec![], "{compression}");
        assert_eq!(
            (c.file_bytes, c.nar_bytes),
            (file.len() as u64, nar.len() as u64)
        );
        let c = check(&file, &want, Some(listing.json()));
        assert_eq!(c.problems, vec![], "{compression} with its listing");
    }
}

#[test]
fn each_damage_is_named() {
    let nar = nar();
    let file = compress(&nar, "zstd");
    let want = expected(&nar, &file, "zstd");

    let mut flipped = file.clone();
    let at = flipped.len() / 3;
    flipped[at] ^= 0x40;
    assert_eq!(kinds(&check(&flipped, &want, None)), [Kind::FileHash]);

    // Bytes that hash as the narinfo says but do not decompress.
    let garbage = b"not zstd at all".to_vec();
    let lying = expected(&nar, &garbage, "zstd");
    assert_eq!(kinds(&check(&garbage, &lying, None)), [Kind::Undecodable]);
    let unknown = Expected {
        compression: "lz4".into(),
        ..want.clone()
    };
    assert_eq!(kinds(&check(&file, &unknown, None)), [Kind::Undecodable]);

    let other_size = Expected {
        nar_size: want.nar_size + 8,
        ..want.clone()
    };
    assert_eq!(
        kinds(&check(&file, &other_size, None)),
        [Kind::NarSizeMismatch]
    );
    let other_hash = Expected {
        nar_hash: Sha256::digest(b"another NAR"),
        ..want.clone()
    };
    assert_eq!(kinds(&check(&file, &other_hash, None)), [Kind::NarHash]);
    // Without FileHash, the NAR's own checks still find the damage.
    let no_file_hash = Expected {
        file_hash: None,
        ..want.clone()
    };
    let c = check(&flipped, &no_file_hash, None);
    assert!(
        matches!(kinds(&c)[..], [Kind::Undecodable | Kind::NarHash]),
        "{c:?}"
    );
}

#[test]
fn listings_are_compared_by_the_tree_they_describe() {
    let nar = nar();
    let file = compress(&nar, "xz");
    let want = expected(&nar, &file, "xz");
    let ours = String::from_utf8(list_node(&tree()).json().to_vec()).unwrap();

    // Written another way (spaces, key order, no narOffset): the same tree.
    let mut value: serde_json::Value = serde_json::from_str(&ours).unwrap();
    value["root"]["entries"]["data"]
        .as_object_mut()
        .unwrap()
        .remove("narOffset");
    let pretty = serde_json::to_string_pretty(&value).unwrap();
    assert_eq!(
        check(&file, &want, Some(pretty.as_bytes())).problems,
        vec![]
    );

    let wrong_size = ours.replace(r#""size":100000"#, r#""size":99999"#);
    assert_eq!(
        kinds(&check(&file, &want, Some(wrong_size.as_bytes()))),
        [Kind::ListingMismatch]
    );
    let wrong_offset = ours.replace(r#""narOffset":"#, r#""narOffset":1"#);
    assert_eq!(
        kinds(&check(&file, &want, Some(wrong_offset.as_bytes()))),
        [Kind::ListingMismatch]
    );
    let missing_entry = ours.replace(r#""link":{"type":"symlink","target":"data"}"#, "");
    assert_eq!(
        kinds(&check(&file, &want, Some(missing_entry.as_bytes()))),
        [Kind::UnparsableListing],
        "a trailing comma is not JSON"
    );
    let other_target = ours.replace(r#""target":"data""#, r#""target":"bin""#);
    assert_eq!(
        kinds(&check(&file, &want, Some(other_target.as_bytes()))),
        [Kind::ListingMismatch]
    );
    assert_eq!(
        kinds(&check(&file, &want, Some(b"{\"version\":2,\"root\":{}}"))),
        [Kind::UnparsableListing]
    );
    // A damaged NAR is named for itself; its listing is not compared.
    let mut flipped = file.clone();
    flipped[40] ^= 1;
    assert_eq!(
        kinds(&check(&flipped, &want, Some(wrong_size.as_bytes()))),
        [Kind::FileHash]
    );
}

#[test]
fn a_failing_read_is_an_error_not_a_problem() {
    struct Fails(usize);
    impl Read for Fails {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
            }
            self.0 -= 1;
            buf[0] = 0;
            Ok(1)
        }
    }
    let nar = nar();
    let file = compress(&nar, "zstd");
    let want = expected(&nar, &file, "zstd");
    for compression in ["zstd", "xz", "none"] {
        let want = Expected {
            compression: compression.into(),
            ..want.clone()
        };
        let e = check_nar(&mut Fails(3), &want, None, &|_| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{compression}");
    }
}

#[test]
fn the_ceiling_checks_the_sample() {
    let nar = nar();
    let sample: Vec<(Expected, Vec<u8>)> = ["zstd", "xz", "none"]
        .iter()
        .map(|c| {
            let file = compress(&nar, c);
            (expected(&nar, &file, c), file)
        })
        .collect();
    let c = measure_ceiling(&sample, 2, 2).unwrap();
    assert_eq!((c.nars, c.nar_bytes), (3, 3 * nar.len() as u64));
    assert!(c.nar_mb_per_s > 0.0);
}
