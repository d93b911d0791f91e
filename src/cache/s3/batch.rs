//! Requests on many objects at once (narinfo lookups by HEAD or by one listing, narinfo
//! GETs and PUTs), a bounded number in flight.
use super::Shared;
use super::retry::{Op, join_error};
use crate::cache::CacheError;
use std::sync::Arc;
use tokio::task::JoinSet;

/// A batch of at least this many narinfo lookups first tries one listing of the bucket.
pub(super) const LIST_THRESHOLD: usize = 512;

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

/// Runs `op` on every key, `S3Tuning::concurrency` at a time; the answers in the keys'
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
        while set.len() < s.concurrency {
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
    use crate::cache::BinaryCache;
    use crate::format::store_path::StorePath;

    /// A batch sends as many requests at once as `S3Tuning::concurrency` says, no more:
    /// the stand-in holds each answer until all six lookups have arrived (or 2 s pass),
    /// so a client that sent them all at once would be seen doing so.
    #[test]
    fn a_batch_has_as_many_requests_in_flight_as_the_concurrency() {
        let (endpoint, seen) = stand_in(6);
        let cache = cache_with(&endpoint, 64 << 20, |t| t.concurrency = 3);
        let paths: Vec<StorePath> = (0..6)
            .map(|i| StorePath::from_base_name(&format!("{i:0>32}-p").replace('0', "a")).unwrap())
            .collect();
        assert_eq!(cache.has_narinfos(&paths).unwrap(), vec![true; 6]);
        assert_eq!(seen.most_in_flight(), 3);
    }
}
