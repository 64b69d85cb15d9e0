//! The optional disk tier: stored responses survive a restart.
//!
//! One file per stored variant, named by the SHA-256 of its key and `Vary` values:
//! `RMPC1\n`, the metadata as JSON (key, status, times, freshness, directives' effect,
//! `Vary` values, tags), the header block, the body, and a SHA-256 of everything
//! before it. Files are written by a background thread through a bounded queue
//! (a full queue drops the write, never blocks a request), to a temporary name and
//! then renamed. At start the index is rebuilt from each file's head; bodies are read
//! (on the blocking pool) and checked only when used: a corrupt or truncated file is
//! deleted and treated as a miss. Least recently used files go first when the tier is
//! over its size, and each one is counted in `rampart_cache_disk_evictions_total`.
//! A soft purge marks files stale in the index at once and rewrites their metadata on
//! the writer thread, so the mark survives a restart.

use super::{CacheControl, Entry};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

const MAGIC: &[u8; 6] = b"RMPC1\n";
const QUEUE: usize = 1024;

#[derive(Serialize, Deserialize)]
struct Meta {
    key: String,
    status: u16,
    request_time: f64,
    response_time: f64,
    date_value: f64,
    age_value: f64,
    freshness: f64,
    vary: Vec<(String, Option<String>)>,
    tags: Vec<String>,
    /// Soft-purged: validate with the origin before use (absent in older files).
    #[serde(default)]
    purged: bool,
}

struct FileInfo {
    path: PathBuf,
    size: u64,
    vary: Vec<(String, Option<String>)>,
    tags: Vec<String>,
    purged: bool,
    last_used: u64,
}

/// Work for the writer thread.
enum Job {
    Write(String, Arc<Entry>),
    /// Rewrite a file with its soft-purge mark set.
    MarkPurged(PathBuf),
}

pub struct Disk {
    capacity: u64,
    index: Arc<Mutex<Index>>,
    tx: SyncSender<Job>,
}

#[derive(Default)]
struct Index {
    by_key: HashMap<String, Vec<FileInfo>>,
    used: u64,
    clock: u64,
}

fn file_name(key: &str, vary: &[(String, Option<String>)]) -> String {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    for (n, v) in vary {
        h.update(b"\0");
        h.update(n.as_bytes());
        h.update(b"=");
        h.update(v.as_deref().unwrap_or("").as_bytes());
    }
    let d = h.finalize();
    format!(
        "{}.obj",
        d.iter().take(20).map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn vary_strings(e: &Entry) -> Vec<(String, Option<String>)> {
    e.vary
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.clone()))
        .collect()
}

fn encode(key: &str, e: &Entry) -> Option<Vec<u8>> {
    let meta = Meta {
        key: key.to_string(),
        status: e.status.as_u16(),
        request_time: e.request_time,
        response_time: e.response_time,
        date_value: e.date_value,
        age_value: e.age_value,
        freshness: e.freshness,
        vary: vary_strings(e),
        tags: e.tags.clone(),
        purged: e.purged,
    };
    let meta = serde_json::to_vec(&meta).ok()?;
    let mut headers = Vec::new();
    for (n, v) in &e.headers {
        headers.extend_from_slice(n.as_str().as_bytes());
        headers.extend_from_slice(b": ");
        headers.extend_from_slice(v.as_bytes());
        headers.extend_from_slice(b"\r\n");
    }
    let mut out = Vec::with_capacity(64 + meta.len() + headers.len() + e.body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(meta.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&u32::try_from(headers.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(&(e.body.len() as u64).to_be_bytes());
    out.extend_from_slice(&e.body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Some(out)
}

fn read_u32(b: &[u8], at: &mut usize) -> Option<usize> {
    let v = u32::from_be_bytes(b.get(*at..at.checked_add(4)?)?.try_into().ok()?);
    *at += 4;
    usize::try_from(v).ok()
}

/// Just the metadata, from the start of a file (for the index at start-up).
fn read_meta(path: &Path) -> Option<Meta> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 10];
    f.read_exact(&mut head).ok()?;
    if &head[..6] != MAGIC {
        return None;
    }
    let len = usize::try_from(u32::from_be_bytes(head[6..10].try_into().ok()?)).ok()?;
    if len > 1 << 20 {
        return None;
    }
    let mut meta = vec![0u8; len];
    f.read_exact(&mut meta).ok()?;
    serde_json::from_slice(&meta).ok()
}

/// A whole file, checked against its SHA-256; `None` when corrupt or truncated.
fn decode(bytes: &[u8]) -> Option<(Meta, Entry)> {
    if bytes.len() < MAGIC.len() + 32 || &bytes[..6] != MAGIC {
        return None;
    }
    let (content, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(content).as_slice() != sum {
        return None;
    }
    // Every length comes from the file: checked arithmetic, never a panic.
    let mut at = 6;
    let meta_len = read_u32(content, &mut at)?;
    let meta: Meta = serde_json::from_slice(content.get(at..at.checked_add(meta_len)?)?).ok()?;
    at = at.checked_add(meta_len)?;
    let headers_len = read_u32(content, &mut at)?;
    let block = content.get(at..at.checked_add(headers_len)?)?;
    at = at.checked_add(headers_len)?;
    let body_len = usize::try_from(u64::from_be_bytes(
        content.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
    .ok()?;
    at = at.checked_add(8)?;
    let body = Bytes::copy_from_slice(content.get(at..at.checked_add(body_len)?)?);
    let mut headers = HeaderMap::new();
    for line in block.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let i = line.iter().position(|b| *b == b':')?;
        let name = HeaderName::from_bytes(&line[..i]).ok()?;
        let value = HeaderValue::from_bytes(line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])).ok()?;
        headers.append(name, value);
    }
    let cc: CacheControl = super::cache_control(&headers);
    let vary = meta
        .vary
        .iter()
        .filter_map(|(n, v)| HeaderName::from_bytes(n.as_bytes()).ok().map(|n| (n, v.clone())))
        .collect();
    let entry = Entry {
        status: StatusCode::from_u16(meta.status).ok()?,
        headers,
        body,
        request_time: meta.request_time,
        response_time: meta.response_time,
        date_value: meta.date_value,
        age_value: meta.age_value,
        freshness: meta.freshness,
        cc,
        vary,
        tags: meta.tags.clone(),
        purged: meta.purged,
    };
    Some((meta, entry))
}

impl Disk {
    /// Open (creating) the directory, rebuild the index, start the writer thread.
    pub fn open(dir: PathBuf, capacity: u64, evicted: Counter) -> std::io::Result<Disk> {
        std::fs::create_dir_all(&dir)?;
        let mut index = Index::default();
        for f in std::fs::read_dir(&dir)?.filter_map(Result::ok) {
            let path = f.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("obj") => match (read_meta(&path), f.metadata()) {
                    (Some(meta), Ok(md)) => {
                        index.used += md.len();
                        index.by_key.entry(meta.key).or_default().push(FileInfo {
                            path,
                            size: md.len(),
                            vary: meta.vary,
                            tags: meta.tags,
                            purged: meta.purged,
                            last_used: 0,
                        });
                    }
                    // Unreadable heads are garbage from a crash: remove them.
                    _ => {
                        let _ = std::fs::remove_file(&path);
                    }
                },
                // Half-written temporary files.
                Some("tmp") => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let windex = index.clone();
        std::thread::Builder::new()
            .name("rampart-cache-disk".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Write(key, entry) => write_one(&dir, &windex, capacity, &key, &entry, &evicted),
                        Job::MarkPurged(path) => mark_purged(&path),
                    }
                }
            })?;
        Ok(Disk { capacity, index, tx })
    }

    /// Queue a write; dropped (not blocking) when the writer is behind.
    pub fn store(&self, key: &str, entry: Arc<Entry>) {
        if entry.body.len() as u64 > self.capacity {
            return;
        }
        let _ = self.tx.try_send(Job::Write(key.to_string(), entry));
    }

    /// The stored variant matching the request, read and checked (blocking: call it
    /// from the blocking pool).
    pub fn load(&self, key: &str, req: &HeaderMap) -> Option<Entry> {
        let path = {
            let mut idx = self.index.lock().ok()?;
            idx.clock += 1;
            let clock = idx.clock;
            let files = idx.by_key.get_mut(key)?;
            let f = files.iter_mut().find(|f| {
                f.vary
                    .iter()
                    .all(|(n, v)| HeaderName::from_bytes(n.as_bytes()).is_ok_and(|n| super::normalised(req, &n) == *v))
            })?;
            f.last_used = clock;
            (f.path.clone(), f.purged)
        };
        let (path, purged) = path;
        let bytes = std::fs::read(&path).ok();
        match bytes.as_deref().and_then(decode) {
            // The index's mark is set before the file is rewritten: either one counts.
            Some((meta, mut entry)) if meta.key == key => {
                entry.purged |= purged;
                Some(entry)
            }
            _ => {
                tracing::warn!(file = %path.display(), "corrupt cache file dropped");
                self.remove_file(key, &path);
                None
            }
        }
    }

    fn remove_file(&self, key: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        if let Ok(mut idx) = self.index.lock() {
            let mut freed = 0;
            if let Some(files) = idx.by_key.get_mut(key) {
                files.retain(|f| {
                    let keep = f.path != path;
                    if !keep {
                        freed += f.size;
                    }
                    keep
                });
                if files.is_empty() {
                    idx.by_key.remove(key);
                }
            }
            idx.used = idx.used.saturating_sub(freed);
        }
    }

    /// Purge the files of keys matching `select` (and carrying `tag`, when given):
    /// remove them, or with `soft` mark them stale so their next use is validated.
    /// Returns the number of files.
    pub fn purge(&self, select: &dyn Fn(&str) -> bool, tag: Option<&str>, soft: bool) -> usize {
        let victims: Vec<(String, PathBuf)> = match self.index.lock() {
            Ok(mut idx) => idx
                .by_key
                .iter_mut()
                .filter(|(k, _)| select(k))
                .flat_map(|(k, files)| {
                    files
                        .iter_mut()
                        .filter(|f| tag.is_none_or(|t| f.tags.iter().any(|x| x == t)))
                        .map(|f| {
                            f.purged |= soft;
                            (k.clone(), f.path.clone())
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for (k, p) in &victims {
            // A soft mark that cannot be queued degrades to a hard purge: either way
            // the stale copy is never served unvalidated.
            if !soft || self.tx.try_send(Job::MarkPurged(p.clone())).is_err() {
                self.remove_file(k, p);
            }
        }
        victims.len()
    }

    pub fn bytes(&self) -> u64 {
        self.index.lock().map_or(0, |i| i.used)
    }

    pub fn files(&self) -> usize {
        self.index.lock().map_or(0, |i| i.by_key.values().map(Vec::len).sum())
    }
}

/// Rewrite a file with its soft-purge mark set (to a temporary name, then renamed).
/// A file that is gone or corrupt by now is left to `load` to deal with.
fn mark_purged(path: &Path) {
    let Some((meta, mut entry)) = std::fs::read(path).ok().as_deref().and_then(decode) else {
        return;
    };
    if meta.purged {
        return;
    }
    entry.purged = true;
    let Some(bytes) = encode(&meta.key, &entry) else { return };
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = written {
        tracing::warn!(file = %path.display(), error = %err, "cache disk rewrite failed");
        let _ = std::fs::remove_file(&tmp);
    }
}

fn write_one(dir: &Path, index: &Mutex<Index>, capacity: u64, key: &str, e: &Entry, evicted: &Counter) {
    let Some(bytes) = encode(key, e) else { return };
    let vary = vary_strings(e);
    let name = file_name(key, &vary);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(err) = written {
        tracing::warn!(file = %path.display(), error = %err, "cache disk write failed");
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    let Ok(mut idx) = index.lock() else { return };
    idx.clock += 1;
    let clock = idx.clock;
    let size = bytes.len() as u64;
    let files = idx.by_key.entry(key.to_string()).or_default();
    let mut freed = 0;
    files.retain(|f| {
        let keep = f.path != path;
        if !keep {
            freed += f.size;
        }
        keep
    });
    files.push(FileInfo {
        path,
        size,
        vary,
        tags: e.tags.clone(),
        purged: e.purged,
        last_used: clock,
    });
    idx.used = idx.used.saturating_sub(freed) + size;
    // Over the size: least recently used files go first.
    while idx.used > capacity {
        let Some((k, p, s)) = idx
            .by_key
            .iter()
            .flat_map(|(k, fs)| fs.iter().map(move |f| (k, f)))
            .min_by_key(|(_, f)| f.last_used)
            .map(|(k, f)| (k.clone(), f.path.clone(), f.size))
        else {
            break;
        };
        let _ = std::fs::remove_file(&p);
        if let Some(fs) = idx.by_key.get_mut(&k) {
            fs.retain(|f| f.path != p);
            if fs.is_empty() {
                idx.by_key.remove(&k);
            }
        }
        idx.used = idx.used.saturating_sub(s);
        evicted.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static("max-age=60"));
        h.insert(
            "x-bytes",
            HeaderValue::from_bytes(b"caf\xe9").unwrap_or(HeaderValue::from_static("x")),
        );
        Entry::new(
            StatusCode::OK,
            h,
            Bytes::from_static(b"hello body"),
            10.0,
            11.0,
            &HeaderMap::new(),
            86_400.0,
        )
    }

    #[test]
    fn round_trip_and_corruption() {
        let e = entry();
        let bytes = encode("k", &e).unwrap_or_default();
        let (meta, back) = decode(&bytes).unwrap_or_else(|| panic!("decodes"));
        assert_eq!(meta.key, "k");
        assert_eq!(back.body, e.body);
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.freshness, e.freshness);
        // Any flipped byte or truncation is detected.
        for i in [0, 7, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_none(), "flip at {i}");
        }
        assert!(decode(&bytes[..bytes.len() - 5]).is_none());
    }

    #[test]
    fn lengths_from_the_file_cannot_overflow() {
        // A file whose checksum is right but whose body length is absurd.
        let mut content = Vec::new();
        content.extend_from_slice(MAGIC);
        let meta = br#"{"key":"k","status":200,"request_time":0,"response_time":0,"date_value":0,"age_value":0,"freshness":0,"vary":[],"tags":[]}"#;
        content.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        content.extend_from_slice(meta);
        content.extend_from_slice(&0u32.to_be_bytes());
        content.extend_from_slice(&u64::MAX.to_be_bytes());
        let sum = Sha256::digest(&content);
        content.extend_from_slice(&sum);
        assert!(decode(&content).is_none());
    }
}
