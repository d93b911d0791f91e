//! The words of `narflow verify`'s report: the kinds of problem and one problem (an
//! object and what is wrong with it), shared by the checks of narinfos and of NAR contents.
use std::fmt;

/// Narinfos read per request batch: enough to keep a remote cache's concurrency busy,
/// while their texts (a few KiB each) stay a few MiB at most.
pub const BATCH: usize = 512;

/// What is wrong with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A narinfo that does not parse.
    Unparsable,
    /// A narinfo whose StorePath has another hash part than its key.
    WrongStorePath,
    /// A narinfo with a signature by a trusted key's name that does not verify, and none
    /// that does.
    BadSignature,
    /// A narinfo signed by no trusted key (or not at all).
    Untrusted,
    /// A narinfo whose NAR (its URL) is not in the cache.
    NarMissing,
    /// A narinfo whose NAR is in the cache with another size than its FileSize.
    NarSize,
    /// A narinfo whose NAR's bytes do not hash to its FileHash (`--contents`).
    FileHash,
    /// A narinfo whose NAR does not decompress by its Compression, or is not a NAR
    /// (`--contents`).
    Undecodable,
    /// A narinfo whose NAR decompresses to another size than its NarSize (`--contents`).
    NarSizeMismatch,
    /// A narinfo whose NAR decompresses to bytes that do not hash to its NarHash
    /// (`--contents`).
    NarHash,
    /// A `.ls` listing that is not a listing (`--contents`).
    UnparsableListing,
    /// A `.ls` listing that describes another tree than its path's NAR (`--contents`).
    ListingMismatch,
    /// A narinfo with a reference whose narinfo is not in the cache.
    MissingReference,
    /// A path asked about that has no narinfo in the cache.
    MissingNarinfo,
    /// A NAR no narinfo names. This kind and the two after it are looked for only when
    /// the whole cache is verified.
    OrphanNar,
    /// A temporary file or staging object an upload left behind (or one still running).
    Leftover,
    /// A multipart upload neither completed nor aborted.
    UnfinishedUpload,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 17] = [
        Kind::Unparsable,
        Kind::WrongStorePath,
        Kind::BadSignature,
        Kind::Untrusted,
        Kind::NarMissing,
        Kind::NarSize,
        Kind::FileHash,
        Kind::Undecodable,
        Kind::NarSizeMismatch,
        Kind::NarHash,
        Kind::UnparsableListing,
        Kind::ListingMismatch,
        Kind::MissingReference,
        Kind::MissingNarinfo,
        Kind::OrphanNar,
        Kind::Leftover,
        Kind::UnfinishedUpload,
    ];

    /// The kind's name in reports and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unparsable => "unparsable-narinfo",
            Kind::WrongStorePath => "wrong-store-path",
            Kind::BadSignature => "bad-signature",
            Kind::Untrusted => "untrusted",
            Kind::NarMissing => "nar-missing",
            Kind::NarSize => "nar-size",
            Kind::FileHash => "file-hash",
            Kind::Undecodable => "undecodable-nar",
            Kind::NarSizeMismatch => "decompressed-size",
            Kind::NarHash => "nar-hash",
            Kind::UnparsableListing => "unparsable-listing",
            Kind::ListingMismatch => "listing-mismatch",
            Kind::MissingReference => "missing-reference",
            Kind::MissingNarinfo => "missing-narinfo",
            Kind::OrphanNar => "orphan-nar",
            Kind::Leftover => "leftover",
            Kind::UnfinishedUpload => "unfinished-upload",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem: the object and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    /// The object's key (`<hash>.narinfo`, `nar/...`), or a store path asked about.
    pub object: String,
    /// What is wrong, in words.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.kind, self.detail)
    }
}
