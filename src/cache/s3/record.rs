//! The record of the narinfos this cache wrote, in the upload journal
//! (`OpenOptions::journal`): each with the ETag its PUT was answered with and the keys
//! whose valid signatures it carried, so that a listing showing the same ETag answers for
//! the narinfo without a GET ([`crate::cache::FoundNarinfo::Unchanged`]). The ETag names
//! the object's bytes: another writer's rewrite, a deletion or a gc changes or removes it,
//! and the narinfo is then read (or found absent) as without a record. A record that
//! cannot be written or read costs those reads, never a wrong answer: its errors are
//! logged, not returned. Every journal call runs on the caller's thread, never on the
//! runtime's workers.
use super::Shared;
use crate::cache::resume::{SignerSet, WrittenNarinfo, normalise_etag};
use crate::format::narinfo::NarInfo;
use std::collections::HashMap;

impl Shared {
    /// Who signed `n` as it is written: those of this writer's keys
    /// (`OpenOptions::signers`) whose valid signature it carries, each verified; `None`
    /// when nothing is to be recorded (no journal, or none of them signed it).
    pub(super) fn signed_by(&self, n: &NarInfo, store_dir: &str) -> Option<SignerSet> {
        if self.journal.is_none() || self.signers.is_empty() {
            return None;
        }
        let fingerprint = n.fingerprint(store_dir);
        let signed: Vec<_> = self
            .signers
            .iter()
            .filter(|k| n.sigs.iter().any(|s| k.verify(&fingerprint, s)))
            .collect();
        (!signed.is_empty()).then(|| SignerSet::of(signed))
    }

    /// Records the narinfos of `written` whose PUT was answered with an ETag (a narinfo
    /// without one, or signed by none of our keys, loses its record: it is read next
    /// time), in one transaction.
    pub(super) fn record_written(
        &self,
        written: impl IntoIterator<Item = ([u8; 20], Option<String>, Option<SignerSet>)>,
    ) {
        let Some(journal) = &self.journal else { return };
        if self.signers.is_empty() {
            // An unsigned writer records nothing, and needs no record: its look at the
            // cache reads no narinfo.
            return;
        }
        let mut record = Vec::new();
        let mut forget = Vec::new();
        for (hash, etag, signers) in written {
            let etag = etag.as_deref().map(normalise_etag).unwrap_or_default();
            match signers {
                Some(signers) if !etag.is_empty() => record.push(WrittenNarinfo {
                    hash,
                    etag: etag.to_owned(),
                    signers,
                }),
                _ => forget.push(hash),
            }
        }
        let done = journal
            .narinfos_written(&self.bucket_id, &record)
            .and_then(|()| journal.forget_narinfos(&self.bucket_id, &forget));
        if let Err(e) = done {
            tracing::warn!(
                "{}: recording the narinfos written: {e} (the next push reads them)",
                self.url
            );
        }
    }

    /// The records of the narinfos `hashes` names (none without a journal, or when it
    /// cannot be read).
    pub(super) fn recorded(&self, hashes: &[[u8; 20]]) -> HashMap<[u8; 20], WrittenNarinfo> {
        let Some(journal) = &self.journal else {
            return HashMap::new();
        };
        match journal.written_narinfos(&self.bucket_id, hashes) {
            Ok(records) => records.into_iter().flatten().map(|w| (w.hash, w)).collect(),
            Err(e) => {
                tracing::warn!(
                    "{}: reading the record of narinfos written: {e} (they are read instead)",
                    self.url
                );
                HashMap::new()
            }
        }
    }

    /// Forgets the records of `hashes` (their narinfos found gone, or rewritten by another
    /// writer).
    pub(super) fn forget_recorded(&self, hashes: &[[u8; 20]]) {
        let Some(journal) = &self.journal else { return };
        if let Err(e) = journal.forget_narinfos(&self.bucket_id, hashes) {
            tracing::warn!("{}: forgetting records of narinfos: {e}", self.url);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::cache::resume::{SignerSet, SqliteJournal, UploadJournal, WrittenNarinfo};
    use crate::cache::{BinaryCache, FoundNarinfo, NarinfoSet};
    use crate::format::narinfo::NarInfo;
    use crate::format::signing::SigningKey;
    use crate::format::store_path::StorePath;
    use std::sync::Arc;

    fn journal(dir: &tempfile::TempDir) -> Arc<SqliteJournal> {
        Arc::new(SqliteJournal::open(&dir.path().join("uploads.sqlite")).unwrap())
    }

    fn narinfo(hash: &str, key: Option<&SigningKey>) -> NarInfo {
        let mut n = NarInfo {
            store_path: StorePath::from_base_name(&format!("{hash}-p")).unwrap(),
            url: "nar/x.nar".into(),
            compression: "none".into(),
            file_hash: None,
            file_size: Some(1),
            nar_hash: crate::format::hash::Sha256::digest(hash.as_bytes()),
            nar_size: 1,
            references: vec![],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        if let Some(k) = key {
            n.sign(k, "/nix/store");
        }
        n
    }

    fn gets(seen: &Seen) -> Vec<String> {
        seen.requests()
            .into_iter()
            .map(|(l, _)| l)
            .filter(|l| l.starts_with("GET ") && l.contains(".narinfo"))
            .collect()
    }

    /// A narinfo written is recorded with the ETag its PUT was answered with and the keys
    /// whose signatures it carries, under the bucket and endpoint (not the URL's other
    /// options); one signed by none of the writer's keys is not recorded.
    #[test]
    fn a_narinfo_written_is_recorded_with_its_etag_and_signers() {
        let (endpoint, _) = stand_in(1);
        let dir = tempfile::tempdir().unwrap();
        let j = journal(&dir);
        let (ours, other) = (
            SigningKey::from_seed("ours-1", [1; 32]),
            SigningKey::from_seed("other-1", [2; 32]),
        );
        let cache = recording_cache(&endpoint, "", j.clone(), vec![ours.verifying_key()]);
        let signed = narinfo(LISTED[0], Some(&ours));
        let foreign = narinfo(LISTED[1], Some(&other));
        let far = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let published = cache
            .publish_narinfos_by("/nix/store", vec![signed.clone(), foreign.clone()], far)
            .unwrap();
        assert!(published.iter().all(Result::is_ok), "{published:?}");
        // The same bucket through a URL with other options reads the same record.
        let again = recording_cache(&endpoint, "&concurrency=3", j.clone(), vec![]);
        let hashes = [
            NarinfoSet::key(&signed.store_path),
            NarinfoSet::key(&foreign.store_path),
        ];
        let records = j
            .written_narinfos(&again.shared.bucket_id, &hashes)
            .unwrap();
        assert_eq!(
            records,
            vec![
                Some(WrittenNarinfo {
                    hash: hashes[0],
                    etag: "e".into(),
                    signers: SignerSet::of([&ours.verifying_key()]),
                }),
                None
            ]
        );
        // Another bucket of the same endpoint has no record.
        assert_eq!(
            j.written_narinfos(&format!("s3://c at {endpoint}"), &hashes)
                .unwrap(),
            vec![None, None]
        );
    }

    /// Many paths: a narinfo listed with the ETag recorded for it is not read (it comes
    /// back unchanged, with its signers); one listed with another ETag is read and its
    /// record forgotten, and so is the record of one the listing lacks.
    #[test]
    fn a_listing_answers_for_a_narinfo_with_its_recorded_etag() {
        let (endpoint, seen) = stand_in(1);
        let dir = tempfile::tempdir().unwrap();
        let j = journal(&dir);
        let cache = recording_cache(&endpoint, "", j.clone(), vec![]);
        let mut asked: Vec<StorePath> = (0..super::super::batch::LIST_THRESHOLD)
            .map(|i| StorePath::from_base_name(&format!("{:a>32}-p", i % 10)).unwrap())
            .collect();
        asked[7] = StorePath::from_base_name(&format!("{}-x", LISTED[0])).unwrap();
        asked[300] = StorePath::from_base_name(&format!("{}-y", LISTED[1])).unwrap();
        let gone = "33333333333333333333333333333333";
        asked[400] = StorePath::from_base_name(&format!("{gone}-z")).unwrap();
        let signers = SignerSet([9; 16]);
        let record = |hash: &str, etag: &str| WrittenNarinfo {
            hash: crate::format::nix32::decode::<20>(hash.as_bytes()).unwrap(),
            etag: etag.into(),
            signers,
        };
        let id = cache.shared.bucket_id.clone();
        j.narinfos_written(
            &id,
            &[
                record(LISTED[0], "e"),
                record(LISTED[1], "old"),
                record(gone, "e"),
            ],
        )
        .unwrap();
        let found = cache.find_narinfos(&asked).unwrap();
        for (i, f) in found.iter().enumerate() {
            let want = match i {
                7 => Some(FoundNarinfo::Unchanged(signers)),
                300 => Some(FoundNarinfo::Text(String::new())),
                _ => None,
            };
            assert_eq!(f, &want, "path {i}");
        }
        let reads = gets(&seen);
        assert_eq!(reads.len(), 1, "{reads:?}");
        assert!(reads[0].contains(LISTED[1]), "{reads:?}");
        let hashes: Vec<[u8; 20]> = [LISTED[0], LISTED[1], gone]
            .iter()
            .map(|h| record(h, "").hash)
            .collect();
        let left = j.written_narinfos(&id, &hashes).unwrap();
        assert_eq!(left, vec![Some(record(LISTED[0], "e")), None, None]);
    }

    /// A journal whose records cannot be written or read costs reads, never a write: the
    /// narinfos are published all the same, and a look reads each one it finds, as
    /// without a journal.
    #[test]
    fn a_journal_that_fails_costs_reads_and_never_a_publish() {
        let (endpoint, seen) = stand_in(1);
        let dir = tempfile::tempdir().unwrap();
        let j = journal(&dir);
        // The narinfo records' table is gone: every record read or written fails.
        rusqlite::Connection::open(dir.path().join("uploads.sqlite"))
            .unwrap()
            .execute_batch("DROP TABLE written_narinfos")
            .unwrap();
        let ours = SigningKey::from_seed("ours-1", [1; 32]);
        let cache = recording_cache(&endpoint, "", j.clone(), vec![ours.verifying_key()]);
        let signed = narinfo(LISTED[0], Some(&ours));
        let far = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let published = cache
            .publish_narinfos_by("/nix/store", vec![signed.clone()], far)
            .unwrap();
        assert!(published.iter().all(Result::is_ok), "{published:?}");
        let record = WrittenNarinfo {
            hash: NarinfoSet::key(&signed.store_path),
            etag: "e".into(),
            signers: SignerSet([9; 16]),
        };
        assert!(
            j.narinfos_written(&cache.shared.bucket_id, &[record])
                .is_err(),
            "the injected failure must hold"
        );
        let before = gets(&seen).len();
        let mut asked: Vec<StorePath> = (0..super::super::batch::LIST_THRESHOLD)
            .map(|i| StorePath::from_base_name(&format!("{:a>32}-p", i % 10)).unwrap())
            .collect();
        asked[7] = signed.store_path.clone();
        let found = cache.find_narinfos(&asked).unwrap();
        assert_eq!(found[7], Some(FoundNarinfo::Text(String::new())));
        assert_eq!(gets(&seen).len(), before + 1);
    }

    /// Without a journal nothing is recorded and a listing reads every narinfo it finds
    /// of those asked about, as a cache that records nothing.
    #[test]
    fn without_a_journal_every_narinfo_found_is_read() {
        let (endpoint, seen) = stand_in(1);
        let cache = cache_at(&endpoint, 64 << 20);
        let mut asked: Vec<StorePath> = (0..super::super::batch::LIST_THRESHOLD)
            .map(|i| StorePath::from_base_name(&format!("{:a>32}-p", i % 10)).unwrap())
            .collect();
        asked[7] = StorePath::from_base_name(&format!("{}-x", LISTED[0])).unwrap();
        let found = cache.find_narinfos(&asked).unwrap();
        assert_eq!(found[7], Some(FoundNarinfo::Text(String::new())));
        assert_eq!(gets(&seen).len(), 1);
    }
}
