//! Resumable multipart uploads on a real S3 server, at the cache's level: a NAR begun with
//! `begin_nar_resumable` on a cache with a journal, dropped part-way (as a kill leaves it),
//! and begun again by a cache opened afresh on the same journal (as a restart does). The
//! UploadPart requests of the second run are counted, and the object is read back.
//!
//! Each first run writes with one request in flight, so every part it sent is acknowledged
//! and recorded before the drop: what the second run must send is known exactly.
use crate::helpers::*;
use narflow::cache::BinaryCache;
use narflow::cache::resume::{NarIdentity, RecordedPart, SqliteJournal, UploadJournal};
use narflow::cache::s3::S3Cache;
use std::io::Write;
use std::sync::Arc;

const STAGING_PREFIX: &str = ".narflow-staging/";
/// S3's smallest part: five parts and a short sixth make a NAR of six parts.
const PART: usize = 5 << 20;
const LEN: usize = 5 * PART + 12_345;

struct Fixture {
    s3: S3Env,
    _dir: tempfile::TempDir,
    journal: Arc<SqliteJournal>,
    identity: NarIdentity,
    /// The NAR's final key.
    key: String,
}

impl Fixture {
    fn new(tag: &str) -> Option<Fixture> {
        let s3 = s3_env()?;
        let dir = tempdir();
        let journal = Arc::new(SqliteJournal::open(&dir.path().join("resume.sqlite")).unwrap());
        let name = unique(tag);
        Some(Fixture {
            s3,
            _dir: dir,
            journal,
            identity: NarIdentity {
                store_path: format!("/nix/store/00000000000000000000000000000000-{name}"),
                nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into(),
                compression: "zstd-3/chunk=4194304".into(),
            },
            key: format!("nar/{name}.nar.zst"),
        })
    }

    /// A cache opened afresh (as after a restart) on the journal, in parts of 5 MiB; with
    /// `one_at_a_time`, one request in flight.
    fn cache(&self, one_at_a_time: bool) -> S3Cache {
        self.cache_in(64 << 20, one_at_a_time)
    }

    /// [`Fixture::cache`] with `memory` bytes of upload memory.
    fn cache_in(&self, memory: u64, one_at_a_time: bool) -> S3Cache {
        let url = narflow::cache::url::CacheUrl::parse(&self.s3.url("")).unwrap();
        let mut opts = open_options(&url);
        opts.s3.min_part_size = PART as u64;
        opts.upload_memory = memory;
        if one_at_a_time {
            opts.s3.concurrency = 1;
        }
        opts.journal = Some(self.journal.clone());
        S3Cache::open(&self.s3.bucket, &url, &opts).unwrap()
    }

    /// Writes the first `bytes` of `data` resumably as `identity`, then drops the upload
    /// uncommitted. Returns the staging key the journal records.
    fn interrupted(&self, data: &[u8], bytes: usize) -> String {
        self.interrupted_in(64 << 20, data, bytes)
    }

    /// [`Fixture::interrupted`] with `memory` bytes of upload memory.
    fn interrupted_in(&self, memory: u64, data: &[u8], bytes: usize) -> String {
        let cache = self.cache_in(memory, true);
        let mut up = cache
            .begin_nar_resumable(data.len() as u64, &self.identity)
            .unwrap();
        up.write_all(&data[..bytes]).unwrap();
        drop(up);
        let record = self.record().expect("the dropped upload is recorded");
        let on_server = self.s3.client().multipart_uploads(&record.key);
        assert_eq!(
            on_server,
            [(record.key.clone(), record.upload_id.clone())],
            "the dropped upload is kept on the server"
        );
        record.key
    }

    fn record(&self) -> Option<narflow::cache::resume::RecordedUpload> {
        let url = self.s3.url("");
        self.journal.find(&url, &self.identity.store_path).unwrap()
    }

    /// Uploads `data` resumably as `identity` to its final key; returns the cache (for
    /// its counts).
    fn upload(&self, data: &[u8], identity: &NarIdentity) -> S3Cache {
        let cache = self.cache(false);
        let mut up = cache
            .begin_nar_resumable(data.len() as u64, identity)
            .unwrap();
        up.write_all(data).unwrap();
        up.written();
        up.commit(&self.key).unwrap();
        cache
    }

    /// Checks the object under the final key is `data` and nothing of the upload is left:
    /// no record, no multipart upload or object on `staging`. Deletes the object.
    fn check_and_clean(&self, data: &[u8], staging: &[&str]) {
        let c = self.s3.client();
        let stored = c.get(&self.key).expect("the NAR is under its name");
        c.delete(&self.key);
        assert!(stored == data, "the object differs from the NAR written");
        assert_eq!(self.record(), None, "a completed upload stays recorded");
        for key in staging {
            assert!(key.starts_with(STAGING_PREFIX), "{key}");
            assert_eq!(c.multipart_uploads(key), [], "upload left on {key}");
            assert!(!c.exists(key), "staging object {key} left");
        }
    }
}

fn data(seed: u64) -> Vec<u8> {
    (0..LEN as u64)
        .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn requests(cache: &S3Cache, operation: &str) -> u64 {
    cache
        .request_counts()
        .into_iter()
        .find(|c| c.operation == operation)
        .map_or(0, |c| c.requests)
}

/// Killed after four of six parts: the restart sends the last two only, completes with
/// the recorded ETags, and the object is the NAR, byte for byte.
#[test]
fn a_restarted_upload_sends_only_the_parts_after_the_recorded_ones() {
    let Some(f) = Fixture::new("resume-after-4") else {
        return;
    };
    let data = data(1);
    let staging = f.interrupted(&data, 4 * PART);
    assert_eq!(f.record().unwrap().parts.len(), 4);

    let cache = f.cache(false);
    let mut up = cache
        .begin_nar_resumable(data.len() as u64, &f.identity)
        .unwrap();
    up.write_all(&data[..4 * PART]).unwrap();
    // The four parts found on the server are done and resumed, none sent.
    let progress = cache.large_uploads();
    assert_eq!(progress.len(), 1, "{progress:?}");
    let p = &progress[0];
    assert_eq!(
        p.store_path.as_deref(),
        Some(f.identity.store_path.as_str())
    );
    assert_eq!(
        (p.parts_done, p.bytes_resumed),
        (4, 4 * PART as u64),
        "{p:?}"
    );
    assert!(p.parts_total >= 6 && p.bytes_total >= LEN as u64, "{p:?}");
    assert_eq!(requests(&cache, "UploadPart"), 0);
    up.write_all(&data[4 * PART..]).unwrap();
    up.written();
    up.commit(&f.key).unwrap();
    assert_eq!(requests(&cache, "UploadPart"), 2, "parts 5 and 6 only");
    assert_eq!(requests(&cache, "ListParts"), 1);
    assert_eq!(requests(&cache, "CreateMultipartUpload"), 0);
    assert_eq!(cache.resumed_bytes(), 4 * PART as u64);
    assert!(cache.large_uploads().is_empty());
    f.check_and_clean(&data, &[&staging]);
}

/// The least upload memory S3 takes (`--memory 32M` gives it 16 MiB) holds S3's 5 MiB
/// parts, though they are more than a quarter of it: an upload recorded in such parts
/// resumes there.
#[test]
fn an_upload_in_the_smallest_memory_resumes() {
    let Some(f) = Fixture::new("resume-small-memory") else {
        return;
    };
    let memory = 16 << 20;
    let data = data(8);
    let staging = f.interrupted_in(memory, &data, 4 * PART);
    assert_eq!(f.record().unwrap().part_size, PART as u64);
    let cache = f.cache_in(memory, false);
    let mut up = cache
        .begin_nar_resumable(data.len() as u64, &f.identity)
        .unwrap();
    up.write_all(&data).unwrap();
    up.written();
    up.commit(&f.key).unwrap();
    assert_eq!(requests(&cache, "UploadPart"), 2, "parts 5 and 6 only");
    assert_eq!(cache.resumed_bytes(), 4 * PART as u64);
    f.check_and_clean(&data, &[&staging]);
}

/// Other compression settings make other bytes: the recorded upload is aborted and
/// nothing of it is used.
#[test]
fn other_compression_settings_reuse_nothing() {
    let Some(f) = Fixture::new("resume-other-settings") else {
        return;
    };
    let data = data(2);
    let staging = f.interrupted(&data, 4 * PART);
    let mut other = f.identity.clone();
    other.compression = "zstd-19/chunk=4194304".into();
    let cache = f.upload(&data, &other);
    assert_eq!(requests(&cache, "UploadPart"), 6);
    assert_eq!(requests(&cache, "ListParts"), 0);
    assert_eq!(cache.resumed_bytes(), 0);
    let new = f.s3.client();
    assert_eq!(
        new.multipart_uploads(&staging),
        [],
        "the old upload is aborted"
    );
    f.check_and_clean(&data, &[&staging]);
}

/// A recorded part the server does not list (here: recorded, never sent) is sent; the
/// parts it lists are not.
#[test]
fn a_recorded_part_the_server_lacks_is_sent_again() {
    let Some(f) = Fixture::new("resume-lost-part") else {
        return;
    };
    let data = data(3);
    // Parts 1 to 5 go up and are recorded; the sixth (short) part is sent only by a commit.
    let staging = f.interrupted(&data, LEN);
    let record = f.record().unwrap();
    assert_eq!(record.parts.len(), 5);
    let last = &data[5 * PART..];
    f.journal
        .part_done(
            &record.cache_url,
            &record.upload_id,
            &RecordedPart {
                number: 6,
                size: last.len() as u64,
                blake3: *blake3::hash(last).as_bytes(),
                etag: "\"0123456789abcdef0123456789abcdef\"".into(),
            },
        )
        .unwrap();
    let cache = f.upload(&data, &f.identity);
    assert_eq!(requests(&cache, "UploadPart"), 1, "part 6 only");
    assert_eq!(cache.resumed_bytes(), 5 * PART as u64);
    f.check_and_clean(&data, &[&staging]);
}

/// A recorded part whose ETag is not the one the server lists for it (an upload of the
/// same bytes acknowledged after the record was written, then a kill) is sent again: a
/// Complete with the recorded ETag would be refused.
#[test]
fn a_recorded_part_whose_etag_the_server_does_not_list_is_sent_again() {
    let Some(f) = Fixture::new("resume-stale-etag") else {
        return;
    };
    let data = data(9);
    let staging = f.interrupted(&data, 4 * PART);
    let record = f.record().unwrap();
    let mut stale = record.parts[1].clone();
    assert_eq!(stale.number, 2);
    stale.etag = "\"0123456789abcdef0123456789abcdef\"".into();
    f.journal
        .part_done(&record.cache_url, &record.upload_id, &stale)
        .unwrap();
    let cache = f.upload(&data, &f.identity);
    assert_eq!(requests(&cache, "UploadPart"), 3, "parts 2, 5 and 6");
    assert_eq!(cache.resumed_bytes(), 3 * PART as u64);
    f.check_and_clean(&data, &[&staging]);
}

/// A part whose bytes come out otherwise this time (another zstd, say) is sent again; the
/// object is this run's NAR.
#[test]
fn a_part_whose_bytes_differ_is_sent_again() {
    let Some(f) = Fixture::new("resume-changed-part") else {
        return;
    };
    let before = data(4);
    let staging = f.interrupted(&before, LEN);
    let mut now = before.clone();
    now[2 * PART + 100] ^= 0xff; // in part 3
    let cache = f.upload(&now, &f.identity);
    assert_eq!(requests(&cache, "UploadPart"), 2, "parts 3 and 6");
    assert_eq!(cache.resumed_bytes(), 4 * PART as u64);
    f.check_and_clean(&now, &[&staging]);
}

/// An upload the server no longer has (aborted by someone else) is forgotten and the NAR
/// goes up afresh.
#[test]
fn a_recorded_upload_gone_from_the_server_starts_afresh() {
    let Some(f) = Fixture::new("resume-gone") else {
        return;
    };
    let data = data(5);
    let staging = f.interrupted(&data, 2 * PART);
    let record = f.record().unwrap();
    f.s3.client()
        .abort_multipart(&record.key, &record.upload_id);
    let cache = f.upload(&data, &f.identity);
    assert_eq!(requests(&cache, "ListParts"), 1);
    assert_eq!(requests(&cache, "UploadPart"), 6);
    assert_eq!(cache.resumed_bytes(), 0);
    f.check_and_clean(&data, &[&staging]);
}

/// A resumed upload whose Complete the server refuses for good (here: a part sent again
/// by someone else after ListParts, so its recorded ETag is stale) fails naming the cache
/// and the server's answer, and ends its record: the next attempt starts afresh, not with
/// the same refused upload.
#[test]
fn a_resumed_upload_whose_complete_is_refused_ends_its_record() {
    let Some(f) = Fixture::new("resume-refused") else {
        return;
    };
    let data = data(11);
    let staging = f.interrupted(&data, 4 * PART);
    let record = f.record().unwrap();
    let cache = f.cache(false);
    let mut up = cache
        .begin_nar_resumable(data.len() as u64, &f.identity)
        .unwrap();
    // After ListParts confirmed the recorded parts: part 2 changes on the server.
    let other = vec![0x5a; PART];
    f.s3.client()
        .upload_part(&record.key, &record.upload_id, 2, &other);
    up.write_all(&data).unwrap();
    up.written();
    let err = up.commit(&f.key).expect_err("a Complete with a stale ETag");
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(text.contains(&f.s3.url("")), "names the cache: {text}");
    assert!(text.contains("CompleteMultipartUpload"), "{text}");
    assert_eq!(f.record(), None, "the refused upload stays recorded");
    let c = f.s3.client();
    assert_eq!(
        c.multipart_uploads(&staging),
        [],
        "the refused upload is left"
    );
    assert!(!c.exists(&staging), "staging object {staging} left");
    let cache = f.upload(&data, &f.identity);
    assert_eq!(requests(&cache, "UploadPart"), 6, "a fresh upload");
    assert_eq!(cache.resumed_bytes(), 0);
    f.check_and_clean(&data, &[&staging]);
}

/// A recorded upload completed on the server by a run killed before it copied the object
/// and forgot the record: the next run deletes the staging object and goes up afresh.
#[test]
fn a_recorded_upload_completed_before_a_kill_starts_afresh() {
    let Some(f) = Fixture::new("resume-completed") else {
        return;
    };
    let data = data(10);
    let staging = f.interrupted(&data, LEN);
    let record = f.record().unwrap();
    let parts: Vec<(i32, String)> = record
        .parts
        .iter()
        .map(|p| (p.number, p.etag.clone()))
        .collect();
    let c = f.s3.client();
    c.complete_multipart(&record.key, &record.upload_id, &parts);
    assert!(
        c.exists(&staging),
        "the completed upload made no staging object"
    );
    let cache = f.upload(&data, &f.identity);
    assert_eq!(requests(&cache, "UploadPart"), 6);
    assert_eq!(cache.resumed_bytes(), 0);
    f.check_and_clean(&data, &[&staging]);
}

/// A sweep, however old it takes the upload to be, leaves a recorded upload alone; the
/// caller ends it with `abort_recorded`, which leaves nothing.
#[test]
fn a_sweep_leaves_a_recorded_upload_alone() {
    let Some(f) = Fixture::new("resume-sweep") else {
        return;
    };
    let data = data(6);
    let staging = f.interrupted(&data, 2 * PART);
    let record = f.record().unwrap();
    let cache = f.cache(false);
    let cutoff = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let removed = cache
        .sweep_staging(&staging[STAGING_PREFIX.len()..], cutoff)
        .unwrap();
    assert_eq!(removed, 0);
    let c = f.s3.client();
    assert_eq!(
        c.multipart_uploads(&staging),
        [(staging.clone(), record.upload_id.clone())]
    );
    cache.abort_recorded(&record).unwrap();
    assert_eq!(c.multipart_uploads(&staging), []);
    assert_eq!(f.record(), None);
}

/// Dropped with parts in flight, as a kill finds it: every part is either found on the
/// server (acknowledged and recorded) or sent again, never both, and the object is right.
#[test]
fn an_upload_dropped_with_parts_in_flight_resumes_what_was_acknowledged() {
    let Some(f) = Fixture::new("resume-in-flight") else {
        return;
    };
    let data = data(7);
    {
        let cache = f.cache(false);
        let mut up = cache
            .begin_nar_resumable(data.len() as u64, &f.identity)
            .unwrap();
        // Three parts in flight at most: the fourth waits for two to be acknowledged.
        up.write_all(&data[..4 * PART]).unwrap();
        drop(up);
    }
    let staging = f.record().unwrap().key;
    let cache = f.upload(&data, &f.identity);
    let (sent, resumed) = (requests(&cache, "UploadPart"), cache.resumed_bytes());
    assert_eq!(resumed % PART as u64, 0, "{resumed}");
    assert!(resumed >= 2 * PART as u64, "{resumed} bytes resumed");
    assert_eq!(
        sent + resumed / PART as u64,
        6,
        "{sent} sent, {resumed} resumed"
    );
    f.check_and_clean(&data, &[&staging]);
}
