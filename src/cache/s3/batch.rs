//! Requests on many objects at once (narinfo lookups by HEAD or by one listing, narinfo
//! GETs and PUTs), a bounded number in flight.
use super::Shared;
use super::retry::{Op, join_error};
use crate::cache::resume::{WrittenNarinfo, normalise_etag};
use crate::cache::{CacheError, FoundNarinfo};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinSet;

/// A batch of at least this many narinfo lookups first tries one listing of the bucket.
pub(super) const LIST_THRESHOLD: usize = 512;

/// Small requests (a narinfo's HEAD, GET or PUT, the marker's GET: a few KiB each way) in
/// flight at once for each request `S3Tuning::concurrency` allows: over a link of 30 ms a
/// batch of 1,000 at 256 at once takes four round trips, at 32 it took 32. They hold no
/// upload memory (a batch keeps its answers however many are in flight), only a
/// connection each, so the bound is the server's and the file descriptors': a
/// `concurrency` lowered for a small server lowers this too, and [`MAX_SMALL_IN_FLIGHT`]
/// caps it.
pub(super) const SMALL_PER_REQUEST: usize = 8;

/// Most small requests in flight at once, whatever `S3Tuning::concurrency`: a connection
/// each, well within the usual limit of 1,024 open files.
pub(super) const MAX_SMALL_IN_FLIGHT: usize = 256;

/// Small requests in flight at once for `concurrency` (never fewer than it).
pub(super) fn small_in_flight(concurrency: usize) -> usize {
    concurrency
        .saturating_mul(SMALL_PER_REQUEST)
        .min(MAX_SMALL_IN_FLIGHT)
        .max(concurrency)
}

impl Shared {
    /// Lists the narinfos at the bucket's root (ListObjectsV2 pages of up to 1,000 keys,
    /// each through the retry loop), as the hash parts they name, giving up (None) once
    /// the listing would take more requests than `budget`.
    pub(super) async fn list_narinfos(
        &self,
        budget: usize,
    ) -> Result<Option<crate::cache::NarinfoSet>, CacheError> {
        let mut hashes = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..budget.max(1) {
            let page = self
                .retry(Op::ListObjectsV2, "", || {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .delimiter("/")
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?;
            hashes.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| crate::cache::narinfo_hash(k.as_bytes())),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(Some(hashes.into_iter().collect())),
            }
        }
        Ok(None)
    }
}

/// What a listing found of the narinfos asked about ([`Shared::find_listed_narinfos`]).
#[derive(Debug)]
pub(super) struct Listed {
    /// For each narinfo asked about, in order: its text, or unchanged since recorded, or
    /// `None` when the listing does not have it.
    pub found: Vec<Option<FoundNarinfo>>,
    /// The narinfos recorded ([`Shared::recorded`]) that the listing shows gone or with
    /// another ETag: their records are of no more use.
    pub stale: Vec<[u8; 20]>,
}

impl Shared {
    /// Each narinfo of `wanted` (hash parts, as [`crate::cache::NarinfoSet`] keeps them)
    /// that a listing of the bucket's root finds: [`FoundNarinfo::Unchanged`] when the
    /// listing shows the ETag `recorded` has for it (no GET), else its text, read
    /// ([`small_in_flight`] at once) as soon as its listing page arrives, while the next
    /// page is asked for. `None` once the listing would take more requests than `budget`
    /// (the reads made are dropped).
    pub(super) async fn find_listed_narinfos(
        self: &Arc<Self>,
        wanted: &[[u8; 20]],
        recorded: &HashMap<[u8; 20], WrittenNarinfo>,
        budget: usize,
    ) -> Result<Option<Listed>, CacheError> {
        let index: std::collections::HashSet<[u8; 20]> = wanted.iter().copied().collect();
        // Found narinfos on their way from the listing to their reads: a key and its
        // listed ETag each, and the reads take them as fast as they are listed; the bound
        // only makes a listing that outruns the reads wait for them.
        let (found_tx, mut found_rx) =
            tokio::sync::mpsc::channel::<(String, Option<String>)>(self.small_in_flight);
        let s = self.clone();
        let lister = tokio::spawn(async move {
            let mut token: Option<String> = None;
            for _ in 0..budget.max(1) {
                let page = s
                    .retry(Op::ListObjectsV2, "", || {
                        s.client
                            .list_objects_v2()
                            .bucket(&s.bucket)
                            .delimiter("/")
                            .set_continuation_token(token.clone())
                            .send()
                    })
                    .await?;
                for o in page.contents() {
                    let Some(key) = o.key() else { continue };
                    if crate::cache::narinfo_hash(key.as_bytes())
                        .is_some_and(|h| index.contains(&h))
                        && found_tx
                            .send((key.to_owned(), o.e_tag().map(str::to_owned)))
                            .await
                            .is_err()
                    {
                        return Ok(false);
                    }
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => return Ok(true),
                }
            }
            Ok::<bool, CacheError>(false)
        });
        let mut found: HashMap<[u8; 20], FoundNarinfo> = HashMap::new();
        let mut stale = Vec::new();
        let mut reads = JoinSet::new();
        let mut listing = true;
        loop {
            tokio::select! {
                listed = found_rx.recv(), if listing && reads.len() < self.small_in_flight => {
                    match listed {
                        Some((key, etag)) => {
                            let hash = crate::cache::narinfo_hash(key.as_bytes())
                                .expect("only narinfo keys are listed");
                            let record = recorded.get(&hash);
                            if let (Some(r), Some(etag)) = (record, &etag)
                                && r.etag == normalise_etag(etag)
                            {
                                found.insert(hash, FoundNarinfo::Unchanged(r.signers));
                                continue;
                            }
                            if record.is_some() {
                                stale.push(hash);
                            }
                            let s = self.clone();
                            reads.spawn(async move {
                                let text = s.get_text_lossy(&key).await;
                                (hash, text)
                            });
                        }
                        None => listing = false,
                    }
                }
                Some(done) = reads.join_next(), if !reads.is_empty() => {
                    let (hash, text) = done.map_err(|e| join_error(&self.url, e))?;
                    if let Some(text) = text? {
                        found.insert(hash, FoundNarinfo::Text(text));
                    }
                }
                else => break,
            }
        }
        if !lister.await.map_err(|e| join_error(&self.url, e))?? {
            return Ok(None);
        }
        // Recorded, and not in a whole listing: gone (deleted, or collected by a gc).
        stale.extend(recorded.keys().filter(|h| !found.contains_key(*h)));
        stale.sort_unstable();
        stale.dedup();
        Ok(Some(Listed {
            found: wanted.iter().map(|h| found.get(h).cloned()).collect(),
            stale,
        }))
    }
}

/// Runs `op` on every key, [`small_in_flight`] at a time; the answers in the keys'
/// order. The first error is returned (the requests still running are dropped).
pub(super) async fn concurrently<T, Fut>(
    s: &Arc<Shared>,
    keys: Vec<String>,
    op: impl Fn(Arc<Shared>, String) -> Fut,
) -> Result<Vec<T>, CacheError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<T, CacheError>> + Send + 'static,
{
    let mut out: Vec<Option<T>> = (0..keys.len()).map(|_| None).collect();
    let mut keys = keys.into_iter().enumerate();
    let mut set = JoinSet::new();
    loop {
        while set.len() < s.small_in_flight {
            let Some((i, key)) = keys.next() else { break };
            let request = op(s.clone(), key);
            set.spawn(async move { (i, request.await) });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (i, answer) = done.map_err(|e| join_error(&s.url, e))?;
        out[i] = Some(answer?);
    }
    Ok(out
        .into_iter()
        .map(|a| a.expect("every request was answered"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::cache::{BinaryCache, FoundNarinfo};
    use crate::format::store_path::StorePath;

    /// A batch of small requests sends [`super::SMALL_PER_REQUEST`] times as many at once
    /// as `S3Tuning::concurrency` says, no more: the stand-in holds each answer until 24
    /// lookups have arrived (or 2 s pass), so a client that sent more at once would be
    /// seen doing so, and one that sent fewer would not fill a group.
    #[test]
    fn a_batch_has_its_small_requests_in_flight_at_once() {
        assert_eq!(super::small_in_flight(3), 24);
        let (endpoint, seen) = stand_in(24);
        let cache = cache_with(&endpoint, 64 << 20, |t| t.concurrency = 3);
        assert_eq!(cache.has_narinfos(&paths(48)).unwrap(), vec![true; 48]);
        assert_eq!(seen.most_in_flight(), 24);
    }

    fn paths(n: usize) -> Vec<StorePath> {
        (0..n)
            .map(|i| StorePath::from_base_name(&format!("{i:0>32}-p").replace('0', "a")).unwrap())
            .collect()
    }

    /// A look that reads what it finds asks with one GET a path (it answers what a HEAD
    /// would), not a HEAD and then a GET.
    #[test]
    fn a_look_that_reads_sends_one_get_a_path() {
        let (endpoint, seen) = stand_in(1);
        let cache = cache_at(&endpoint, 64 << 20);
        let texts = cache.find_narinfos(&paths(5)).unwrap();
        assert_eq!(texts, vec![Some(FoundNarinfo::Text(String::new())); 5]);
        let methods: Vec<String> = seen
            .requests()
            .iter()
            .map(|(line, _)| line.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(methods, vec!["GET"; 5]);
    }

    /// Many paths: one listing (two pages here), and a GET for each narinfo it lists of
    /// the paths asked about, none for the others.
    #[test]
    fn a_look_at_many_paths_lists_and_reads_only_what_it_found() {
        let (endpoint, seen) = stand_in(1);
        let cache = cache_at(&endpoint, 64 << 20);
        let mut asked = paths(super::LIST_THRESHOLD);
        asked[7] = StorePath::from_base_name(&format!("{}-x", LISTED[0])).unwrap();
        asked[300] = StorePath::from_base_name(&format!("{}-y", LISTED[1])).unwrap();
        let texts = cache.find_narinfos(&asked).unwrap();
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(t.is_some(), i == 7 || i == 300, "path {i}: {t:?}");
        }
        let lines: Vec<String> = seen.requests().into_iter().map(|(l, _)| l).collect();
        assert_eq!(
            lines.iter().filter(|l| l.contains("list-type=2")).count(),
            2,
            "{lines:#?}"
        );
        let mut reads: Vec<&String> = lines.iter().filter(|l| l.contains(".narinfo")).collect();
        reads.sort();
        assert_eq!(reads.len(), 2, "{lines:#?}");
        assert!(
            reads[0].contains(LISTED[0]) && reads[1].contains(LISTED[1]),
            "{reads:?}"
        );
    }

    /// However large the concurrency, small requests in flight stay within the cap on
    /// open connections, and never below the concurrency.
    #[test]
    fn small_requests_in_flight_are_capped() {
        assert_eq!(super::small_in_flight(1), 8);
        assert_eq!(super::small_in_flight(32), super::MAX_SMALL_IN_FLIGHT);
        assert_eq!(super::small_in_flight(1000), 1000);
    }
}
