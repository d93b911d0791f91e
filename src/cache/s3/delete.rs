//! Deleting many objects: DeleteObjects requests of at most [`MAX_DELETE`] keys, each
//! through the retry loop. Keys the answer says failed transiently are sent again (up to
//! the retries); an answer that is lost or cannot be read leaves the outcome unknown, so
//! every key of the request is looked up (HEAD) before it is reported deleted or not.
//! It deletes only the keys it is given.
use super::Shared;
use super::batch::concurrently;
use super::retry::{Op, backoff};
use crate::cache::{CacheError, MAX_DELETE};
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use std::sync::Arc;

/// Per-key error codes of a DeleteObjects answer that another request may clear.
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "InternalError" | "SlowDown" | "ServiceUnavailable" | "RequestTimeout"
    )
}

impl Shared {
    /// Deletes `keys`; the keys still there, with why.
    ///
    /// # Errors
    /// [`CacheError`] when a request as a whole was refused (its objects are as before),
    /// or its outcome could not be checked.
    pub(super) async fn delete_many(
        self: &Arc<Self>,
        keys: &[String],
    ) -> Result<Vec<(String, CacheError)>, CacheError> {
        let mut failed = Vec::new();
        for chunk in keys.chunks(MAX_DELETE) {
            failed.extend(self.delete_chunk(chunk.to_vec()).await?);
        }
        Ok(failed)
    }

    async fn delete_chunk(
        self: &Arc<Self>,
        mut todo: Vec<String>,
    ) -> Result<Vec<(String, CacheError)>, CacheError> {
        let mut failed = Vec::new();
        let mut attempt = 0u32;
        while !todo.is_empty() {
            let objects = todo
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.request_error(&todo[0], &e))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| self.request_error(&todo[0], &e))?;
            let answer = self
                .retry(Op::DeleteObjects, &todo[0], || {
                    self.client
                        .delete_objects()
                        .bucket(&self.bucket)
                        .delete(delete.clone())
                        .send()
                })
                .await;
            let out = match answer {
                Ok(out) => out,
                Err(e) if e.is_transient() => {
                    failed.extend(self.still_there(todo, &e).await?);
                    return Ok(failed);
                }
                Err(e) => return Err(e),
            };
            let mut again = Vec::new();
            for e in out.errors() {
                let Some(key) = e.key().filter(|k| todo.iter().any(|t| t == k)) else {
                    continue;
                };
                let code = e.code().unwrap_or_default();
                if transient_code(code) && attempt < self.retries {
                    again.push(key.to_owned());
                    continue;
                }
                failed.push((
                    key.to_owned(),
                    CacheError::Remote {
                        cache: self.url.clone(),
                        key: key.to_owned(),
                        message: format!(
                            "DeleteObjects: {code}: {}",
                            e.message().unwrap_or_default()
                        ),
                        transient: transient_code(code),
                    },
                ));
            }
            if !again.is_empty() {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            todo = again;
        }
        Ok(failed)
    }

    /// After an answer that left a deletion's outcome unknown: the keys that are still
    /// there, each with `why`.
    async fn still_there(
        self: &Arc<Self>,
        keys: Vec<String>,
        why: &CacheError,
    ) -> Result<Vec<(String, CacheError)>, CacheError> {
        let present = concurrently(
            self,
            keys.clone(),
            |s, key| async move { s.exists(&key).await },
        )
        .await?;
        Ok(keys
            .into_iter()
            .zip(present)
            .filter(|(_, there)| *there)
            .map(|(key, _)| {
                let e = CacheError::Remote {
                    cache: self.url.clone(),
                    key: key.clone(),
                    message: format!("DeleteObjects did not answer ({why}), and it is still there"),
                    transient: true,
                };
                (key, e)
            })
            .collect())
    }

    fn request_error(&self, key: &str, e: &dyn std::fmt::Display) -> CacheError {
        CacheError::Remote {
            cache: self.url.clone(),
            key: key.to_owned(),
            message: format!("DeleteObjects: {e}"),
            transient: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::cache::BinaryCache;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    fn deletes(cache: &super::super::S3Cache) -> u64 {
        let counts = cache.request_counts();
        counts
            .iter()
            .find(|c| c.operation == "DeleteObjects")
            .map_or(0, |c| c.requests)
    }

    /// The stand-in refuses `nar/refused` for good and `nar/busy` with SlowDown every
    /// time: the first is reported at once, the second after the retries.
    #[test]
    fn each_key_the_answer_names_is_reported_and_transient_ones_are_sent_again() {
        let (endpoint, _) = stand_in(1);
        let cache = cache_with(&endpoint, 64 << 20, |t| t.retries = 1);
        let failed = cache
            .delete_objects(&keys(&["nar/a", "nar/refused", "nar/busy"]))
            .unwrap();
        let named: Vec<(&str, bool)> = failed
            .iter()
            .map(|(k, e)| (k.as_str(), e.is_transient()))
            .collect();
        assert_eq!(named, [("nar/refused", false), ("nar/busy", true)]);
        assert_eq!(deletes(&cache), 2, "nar/busy went once more, alone");
    }

    /// An answer that cannot be read leaves the outcome unknown: each key is looked up,
    /// and what is still there (the stand-in says every key is) is reported.
    #[test]
    fn an_unreadable_answer_is_checked_by_looking_the_keys_up() {
        let (endpoint, seen) = stand_in(1);
        let cache = bucket_with(&endpoint, "garbled", 64 << 20, |_| {});
        let failed = cache
            .delete_objects(&keys(&["nar/a", "b.narinfo"]))
            .unwrap();
        let named: Vec<&str> = failed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(named, ["nar/a", "b.narinfo"]);
        assert!(
            failed[0].1.to_string().contains("still there"),
            "{}",
            failed[0].1
        );
        let heads = seen
            .requests()
            .iter()
            .filter(|(line, _)| line.starts_with("HEAD "))
            .count();
        assert_eq!(heads, 2);
    }

    #[test]
    fn a_request_holds_at_most_a_thousand_keys() {
        let (endpoint, _) = stand_in(1);
        let cache = cache_at(&endpoint, 64 << 20);
        let many: Vec<String> = (0..2001).map(|i| format!("nar/{i}")).collect();
        assert!(cache.delete_objects(&many).unwrap().is_empty());
        assert_eq!(deletes(&cache), 3);
    }
}
