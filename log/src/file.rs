//! The embedded log: append-only segment files on local disk, one directory
//! per partition, with group commit.
//!
//! # Format
//! A partition is a sequence of segment files named by the position of their
//! first byte (`00000000000000000000.log`, ...). A record is framed as a
//! little-endian `u32` payload length, a little-endian `u32` CRC-32 of the
//! payload, then the payload. A record's position is the byte offset of its
//! frame in the partition's stream, so positions are increasing but not
//! contiguous integers.
//!
//! # Durability
//! One writer thread owns the files. It takes every append request that is
//! waiting (up to `max_commit_bytes`), writes them, then `fdatasync`s each
//! partition it touched, in parallel, and only then answers the requests: one
//! sync serves many requests (group commit) and nothing is acknowledged before
//! it is on disk. On start, the tail of each partition is checked frame by
//! frame and a torn write (never acknowledged) is cut off.
//!
//! A std thread does the writing, not a tokio task, because `write` and
//! `fdatasync` block; readers use `spawn_blocking` for the same reason.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    Appended, DeadLetter, Delivery, EventLog, LogError, Record, Result, StartPositions,
    Subscription, partition_for,
};

const FRAME_HEADER: usize = 8;
const READ_CHUNK: usize = 1 << 20;

/// Tuning of the embedded log.
#[derive(Debug, Clone)]
pub struct FileLogOptions {
    /// The number of partitions. Fixed when the log is created; a different
    /// value on reopen is an error.
    pub partitions: u32,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// The most bytes one group commit writes before it syncs.
    pub max_commit_bytes: usize,
    /// Append requests that may wait for the writer before `append` blocks.
    pub queue_depth: usize,
}

impl Default for FileLogOptions {
    fn default() -> Self {
        Self {
            partitions: 4,
            segment_bytes: 256 << 20,
            max_commit_bytes: 8 << 20,
            queue_depth: 4_096,
        }
    }
}

struct PartitionShared {
    dir: PathBuf,
    /// The end of the durable data: readers never read past it.
    committed: AtomicU64,
    /// Base positions of the segments, ascending.
    segments: RwLock<Vec<u64>>,
}

struct Shared {
    dir: PathBuf,
    partitions: Vec<PartitionShared>,
    /// Bumped after every group commit, to wake consumers.
    commits: watch::Sender<u64>,
}

struct AppendRequest {
    frames: Vec<(u32, Vec<u8>)>,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// The embedded, file-backed [`EventLog`].
pub struct FileLog {
    /// Held for the log's lifetime: one process owns a log directory.
    _lock: File,
    /// The log's directory.
    dir: PathBuf,
    /// The dead-letter queue, a one-partition file log in `dead-letters/`,
    /// opened on first use.
    dead: Mutex<Option<Arc<FileLog>>>,
    shared: Arc<Shared>,
    sender: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

fn io_err(context: &str, e: io::Error) -> LogError {
    LogError::Unavailable(format!("{context}: {e}"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = name
            .strip_suffix(".log")
            .and_then(|b| b.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Scans a segment and returns the length of its valid prefix.
fn valid_prefix(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut pos = 0u64;
    let mut header = [0u8; FRAME_HEADER];
    let mut payload = Vec::new();
    while pos + FRAME_HEADER as u64 <= len {
        file.read_exact_at(&mut header, pos)?;
        let size = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let end = pos + FRAME_HEADER as u64 + size;
        if end > len {
            break;
        }
        payload.resize(size as usize, 0);
        file.read_exact_at(&mut payload, pos + FRAME_HEADER as u64)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        pos = end;
    }
    Ok(pos)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct ActiveSegment {
    file: File,
    base: u64,
    len: u64,
}

struct Writer {
    shared: Arc<Shared>,
    active: Vec<ActiveSegment>,
    segment_bytes: u64,
    max_commit_bytes: usize,
    commits: u64,
}

impl FileLog {
    /// Opens (or creates) the log in `dir`, recovering from a crash if needed.
    pub fn open(dir: impl AsRef<Path>, options: FileLogOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if options.partitions == 0 {
            return Err(LogError::Invalid(
                "a log needs at least one partition".into(),
            ));
        }
        fs::create_dir_all(dir).map_err(|e| io_err("create log directory", e))?;
        let lock = File::create(dir.join("LOCK")).map_err(|e| io_err("create lock file", e))?;
        lock.try_lock().map_err(|_| {
            LogError::Invalid(format!(
                "the log at {} is in use by another process",
                dir.display()
            ))
        })?;
        let meta_path = dir.join("partitions");
        match fs::read_to_string(&meta_path) {
            Ok(s) => {
                let existing: u32 = s.trim().parse().map_err(|_| {
                    LogError::Invalid(format!("unreadable {}", meta_path.display()))
                })?;
                if existing != options.partitions {
                    return Err(LogError::Invalid(format!(
                        "log at {} has {existing} partitions, configuration asks for {}",
                        dir.display(),
                        options.partitions
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::write(&meta_path, format!("{}\n", options.partitions))
                    .map_err(|e| io_err("write partition count", e))?;
                sync_dir(dir).map_err(|e| io_err("sync log directory", e))?;
            }
            Err(e) => return Err(io_err("read partition count", e)),
        }

        let mut partitions = Vec::new();
        let mut active = Vec::new();
        for p in 0..options.partitions {
            let pdir = dir.join(format!("partition-{p:04}"));
            fs::create_dir_all(&pdir).map_err(|e| io_err("create partition directory", e))?;
            let mut bases = list_segments(&pdir).map_err(|e| io_err("list segments", e))?;
            if bases.is_empty() {
                File::create(segment_path(&pdir, 0)).map_err(|e| io_err("create segment", e))?;
                sync_dir(&pdir).map_err(|e| io_err("sync partition directory", e))?;
                bases.push(0);
            }
            let base = *bases.last().expect("one segment");
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(segment_path(&pdir, base))
                .map_err(|e| io_err("open segment", e))?;
            let len = valid_prefix(&file).map_err(|e| io_err("scan segment", e))?;
            if len
                != file
                    .metadata()
                    .map_err(|e| io_err("stat segment", e))?
                    .len()
            {
                tracing::warn!(partition = p, base, valid = len, "cutting off a torn write");
                file.set_len(len)
                    .map_err(|e| io_err("truncate segment", e))?;
                file.sync_all().map_err(|e| io_err("sync segment", e))?;
            }
            partitions.push(PartitionShared {
                dir: pdir,
                committed: AtomicU64::new(base + len),
                segments: RwLock::new(bases),
            });
            active.push(ActiveSegment { file, base, len });
        }
        let (commits, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            partitions,
            commits,
        });
        let (sender, receiver) = mpsc::channel(options.queue_depth.max(1));
        let mut writer = Writer {
            shared: shared.clone(),
            active,
            segment_bytes: options.segment_bytes,
            max_commit_bytes: options.max_commit_bytes,
            commits: 0,
        };
        let handle = std::thread::Builder::new()
            .name("trailmark-log-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| io_err("start log writer", e))?;
        Ok(Self {
            _lock: lock,
            dir: dir.to_path_buf(),
            dead: Mutex::new(None),
            shared,
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Stops taking appends, finishes those already queued, and waits for the
    /// writer to stop. Later appends fail with [`LogError::Closed`].
    pub fn close(&self) {
        self.sender.lock().expect("sender lock").take();
        if let Some(handle) = self.writer.lock().expect("writer lock").take() {
            let _ = handle.join();
        }
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl Writer {
    fn run(&mut self, mut receiver: mpsc::Receiver<AppendRequest>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut bytes: usize = first.frames.iter().map(|(_, f)| f.len()).sum();
            let mut batch = vec![first];
            while bytes < self.max_commit_bytes {
                match receiver.try_recv() {
                    Ok(req) => {
                        bytes += req.frames.iter().map(|(_, f)| f.len()).sum::<usize>();
                        batch.push(req);
                    }
                    Err(_) => break,
                }
            }
            match self.commit(&batch) {
                Ok(positions) => {
                    for (req, pos) in batch.into_iter().zip(positions) {
                        let _ = req.reply.send(Ok(pos));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "log group commit failed");
                    for req in batch {
                        let _ = req.reply.send(Err(LogError::Unavailable(e.to_string())));
                    }
                }
            }
        }
    }

    fn commit(&mut self, batch: &[AppendRequest]) -> io::Result<Vec<Vec<Appended>>> {
        let n = self.active.len();
        for p in 0..n {
            if self.active[p].len >= self.segment_bytes {
                self.roll(p)?;
            }
        }
        let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut positions = Vec::with_capacity(batch.len());
        for req in batch {
            let mut out = Vec::with_capacity(req.frames.len());
            for (p, payload) in &req.frames {
                let p = *p as usize;
                let seg = &self.active[p];
                let position = seg.base + seg.len + buffers[p].len() as u64;
                let buf = &mut buffers[p];
                buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
                buf.extend_from_slice(payload);
                out.push(Appended {
                    partition: p as u32,
                    position,
                });
            }
            positions.push(out);
        }
        let result = self.write_and_sync(&buffers);
        if let Err(e) = result {
            // Cut anything half-written so the next commit starts on a frame
            // boundary; none of it was acknowledged.
            for (p, buf) in buffers.iter().enumerate() {
                if !buf.is_empty() {
                    let seg = &self.active[p];
                    let _ = seg.file.set_len(seg.len);
                }
            }
            return Err(e);
        }
        for (p, buf) in buffers.iter().enumerate() {
            if !buf.is_empty() {
                let seg = &mut self.active[p];
                seg.len += buf.len() as u64;
                self.shared.partitions[p]
                    .committed
                    .store(seg.base + seg.len, Ordering::Release);
            }
        }
        self.commits += 1;
        self.shared.commits.send_replace(self.commits);
        Ok(positions)
    }

    fn write_and_sync(&mut self, buffers: &[Vec<u8>]) -> io::Result<()> {
        for (p, buf) in buffers.iter().enumerate() {
            if !buf.is_empty() {
                let seg = &mut self.active[p];
                seg.file.write_all_at(buf, seg.len)?;
            }
        }
        let dirty: Vec<&File> = buffers
            .iter()
            .zip(&self.active)
            .filter(|(b, _)| !b.is_empty())
            .map(|(_, s)| &s.file)
            .collect();
        if dirty.len() == 1 {
            return dirty[0].sync_data();
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = dirty
                .iter()
                .map(|f| scope.spawn(move || f.sync_data()))
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("sync panicked")))
            })
        })
    }

    fn roll(&mut self, p: usize) -> io::Result<()> {
        let part = &self.shared.partitions[p];
        let seg = &self.active[p];
        let base = seg.base + seg.len;
        seg.file.sync_all()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(&part.dir, base))?;
        sync_dir(&part.dir)?;
        part.segments.write().expect("segments lock").push(base);
        self.active[p] = ActiveSegment { file, base, len: 0 };
        Ok(())
    }
}

#[async_trait]
impl EventLog for FileLog {
    fn partitions(&self) -> u32 {
        self.shared.partitions.len() as u32
    }

    async fn append(&self, records: Vec<Record>) -> Result<Vec<Appended>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.partitions();
        let frames = records
            .into_iter()
            .map(|r| (partition_for(&r.key, n), r.payload))
            .collect();
        let sender = self
            .sender
            .lock()
            .expect("sender lock")
            .clone()
            .ok_or(LogError::Closed)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(AppendRequest { frames, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    async fn subscribe(
        &self,
        _group: &str,
        start: Arc<dyn StartPositions>,
    ) -> Result<Box<dyn Subscription>> {
        // One process owns the embedded log, so one consumer of a group reads
        // every partition; consumer positions live with the consumer's state.
        let mut positions = Vec::new();
        for p in 0..self.partitions() {
            let pos = start.start_position(p).await?.unwrap_or(0);
            let committed = self.shared.partitions[p as usize]
                .committed
                .load(Ordering::Acquire);
            if pos > committed {
                return Err(LogError::Invalid(format!(
                    "start position {pos} of partition {p} is past the end of the log ({committed})"
                )));
            }
            positions.push(pos);
        }
        Ok(Box::new(FileSubscription {
            reader: Some(Reader {
                shared: self.shared.clone(),
                positions,
                files: HashMap::new(),
                next: 0,
            }),
            commits: self.shared.commits.subscribe(),
        }))
    }

    async fn end_positions(&self) -> Result<Vec<u64>> {
        Ok(self
            .shared
            .partitions
            .iter()
            .map(|p| p.committed.load(Ordering::Acquire))
            .collect())
    }

    async fn commit_positions(&self, group: &str, positions: &[(u32, u64)]) -> Result<()> {
        let mut all = self.committed_positions(group).await?;
        for (p, pos) in positions {
            if *p >= self.partitions() {
                return Err(LogError::Invalid(format!("no partition {p}")));
            }
            all.insert(*p, *pos);
        }
        let dir = self.shared.dir.join("consumers");
        let path = dir.join(group_file(group));
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            fs::create_dir_all(&dir)?;
            let text: String = all.iter().map(|(p, pos)| format!("{p} {pos}\n")).collect();
            // Write aside, sync, then rename: a crash leaves the old or the new
            // file, never half of one.
            let tmp = path.with_extension("tmp");
            fs::write(&tmp, text)?;
            File::open(&tmp)?.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(&dir)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("commit task failed: {e}")))?
        .map_err(|e| io_err("commit consumer positions", e))
    }

    async fn committed_positions(&self, group: &str) -> Result<BTreeMap<u32, u64>> {
        let path = self.shared.dir.join("consumers").join(group_file(group));
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io_err("read consumer positions", e)),
        };
        text.lines()
            .map(|line| {
                let (p, pos) = line.split_once(' ').ok_or_else(|| bad_positions(&path))?;
                Ok((
                    p.parse().map_err(|_| bad_positions(&path))?,
                    pos.parse().map_err(|_| bad_positions(&path))?,
                ))
            })
            .collect()
    }

    async fn check_ready(&self) -> Result<()> {
        match &*self.sender.lock().expect("sender lock") {
            Some(s) if !s.is_closed() => Ok(()),
            _ => Err(LogError::Closed),
        }
    }

    async fn dead_letter(&self, letters: Vec<DeadLetter>) -> Result<()> {
        let records = letters
            .iter()
            .map(|l| Record {
                key: Vec::new(),
                payload: encode_dead_letter(&DeadLetter {
                    // Letters from the projector name no source: this log.
                    source: if l.source.is_empty() {
                        self.dir.display().to_string()
                    } else {
                        l.source.clone()
                    },
                    ..l.clone()
                }),
            })
            .collect();
        self.dead_letter_queue()?.append(records).await?;
        Ok(())
    }

    async fn dead_letters(&self, from: u64, max: usize) -> Result<Vec<(u64, DeadLetter)>> {
        let queue = self.dead_letter_queue()?;
        let end = queue.end_positions().await?[0];
        if from >= end {
            return Ok(Vec::new());
        }
        struct From(u64);
        #[async_trait]
        impl StartPositions for From {
            async fn start_position(&self, _partition: u32) -> Result<Option<u64>> {
                Ok(Some(self.0))
            }
        }
        let mut sub = queue
            .subscribe("dead-letter-reader", Arc::new(From(from)))
            .await?;
        let mut out = Vec::new();
        while out.len() < max {
            let got = sub
                .poll(max - out.len(), Duration::from_millis(100))
                .await?;
            if got.is_empty() {
                break;
            }
            for d in got {
                out.push((d.position, decode_dead_letter(&d.payload, d.position)?));
            }
            if out.last().is_some_and(|(p, _)| p + 1 >= end) {
                break;
            }
        }
        Ok(out)
    }
}

impl FileLog {
    fn dead_letter_queue(&self) -> Result<Arc<FileLog>> {
        let mut dead = self.dead.lock().expect("dead-letter lock");
        if let Some(q) = &*dead {
            return Ok(q.clone());
        }
        let q = Arc::new(FileLog::open(
            self.dir.join("dead-letters"),
            FileLogOptions {
                partitions: 1,
                ..FileLogOptions::default()
            },
        )?);
        *dead = Some(q.clone());
        Ok(q)
    }
}

/// A dead letter in the file log: partition (u32), position (u64), then the
/// source and the error each as a u32 length and UTF-8, then the payload.
fn encode_dead_letter(l: &DeadLetter) -> Vec<u8> {
    let mut v = Vec::with_capacity(24 + l.source.len() + l.error.len() + l.payload.len());
    v.extend_from_slice(&l.partition.to_be_bytes());
    v.extend_from_slice(&l.position.to_be_bytes());
    for text in [&l.source, &l.error] {
        v.extend_from_slice(&(text.len() as u32).to_be_bytes());
        v.extend_from_slice(text.as_bytes());
    }
    v.extend_from_slice(&l.payload);
    v
}

fn decode_dead_letter(b: &[u8], at: u64) -> Result<DeadLetter> {
    let bad = || LogError::Corrupt {
        partition: 0,
        position: at,
        reason: "dead letter".into(),
    };
    let partition = u32::from_be_bytes(b.get(..4).ok_or_else(bad)?.try_into().expect("4"));
    let position = u64::from_be_bytes(b.get(4..12).ok_or_else(bad)?.try_into().expect("8"));
    let mut i = 12;
    let mut text = || -> Result<String> {
        let n =
            u32::from_be_bytes(b.get(i..i + 4).ok_or_else(bad)?.try_into().expect("4")) as usize;
        let s = b.get(i + 4..i + 4 + n).ok_or_else(bad)?;
        i += 4 + n;
        String::from_utf8(s.to_vec()).map_err(|_| bad())
    };
    let source = text()?;
    let error = text()?;
    Ok(DeadLetter {
        source,
        partition,
        position,
        error,
        payload: Bytes::copy_from_slice(&b[i..]),
    })
}

/// A file name for a consumer group that is safe whatever the group's name.
fn group_file(group: &str) -> String {
    let hex: String = group.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.positions")
}

fn bad_positions(path: &Path) -> LogError {
    LogError::Corrupt {
        partition: 0,
        position: 0,
        reason: format!("unreadable consumer positions in {}", path.display()),
    }
}

struct Reader {
    shared: Arc<Shared>,
    positions: Vec<u64>,
    files: HashMap<(u32, u64), File>,
    /// The partition to read first next time, so none starves.
    next: usize,
}

impl Reader {
    fn read(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let n = self.positions.len();
        let mut out = Vec::new();
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let p = (self.next + i) % n;
            // Share what is left fairly among the partitions not yet read.
            let want = (max - out.len()).div_ceil(n - i);
            self.read_partition(p as u32, want, &mut out)?;
        }
        self.next = (self.next + 1) % n.max(1);
        Ok(out)
    }

    fn read_partition(&mut self, p: u32, max: usize, out: &mut Vec<Delivery>) -> Result<()> {
        let part = &self.shared.partitions[p as usize];
        let committed = part.committed.load(Ordering::Acquire);
        let mut taken = 0;
        while taken < max {
            let pos = self.positions[p as usize];
            if pos >= committed {
                return Ok(());
            }
            let (base, seg_end) = {
                let segs = part.segments.read().expect("segments lock");
                let i = segs.partition_point(|b| *b <= pos);
                if i == 0 {
                    return Err(LogError::Invalid(format!(
                        "position {pos} is before the first segment of partition {p}"
                    )));
                }
                (
                    segs[i - 1],
                    segs.get(i).copied().unwrap_or(committed).min(committed),
                )
            };
            if pos >= seg_end {
                return Err(LogError::Corrupt {
                    partition: p,
                    position: pos,
                    reason: "position is not inside any segment".into(),
                });
            }
            let file = match self.files.entry((p, base)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    File::open(segment_path(&part.dir, base))
                        .map_err(|e| io_err("open segment for reading", e))?,
                ),
            };
            let available = (seg_end - pos) as usize;
            let mut chunk = vec![0u8; available.min(READ_CHUNK)];
            file.read_exact_at(&mut chunk, pos - base)
                .map_err(|e| io_err("read segment", e))?;
            let mut at = 0usize;
            let mut progressed = false;
            while taken < max && at + FRAME_HEADER <= chunk.len() {
                let size = u32::from_le_bytes(chunk[at..at + 4].try_into().expect("4")) as usize;
                let crc = u32::from_le_bytes(chunk[at + 4..at + 8].try_into().expect("4"));
                let end = at + FRAME_HEADER + size;
                if end > chunk.len() {
                    if !progressed {
                        if FRAME_HEADER + size > available {
                            return Err(LogError::Corrupt {
                                partition: p,
                                position: pos + at as u64,
                                reason: "frame runs past the end of its segment".into(),
                            });
                        }
                        // A frame larger than one chunk: read it whole.
                        chunk.resize(FRAME_HEADER + size, 0);
                        file.read_exact_at(&mut chunk, pos - base)
                            .map_err(|e| io_err("read segment", e))?;
                        continue;
                    }
                    break;
                }
                let payload = &chunk[at + FRAME_HEADER..end];
                if crc32fast::hash(payload) != crc {
                    return Err(LogError::Corrupt {
                        partition: p,
                        position: pos + at as u64,
                        reason: "checksum mismatch".into(),
                    });
                }
                out.push(Delivery {
                    partition: p,
                    position: pos + at as u64,
                    next_position: pos + end as u64,
                    payload: Bytes::copy_from_slice(payload),
                });
                at = end;
                taken += 1;
                progressed = true;
            }
            self.positions[p as usize] = pos + at as u64;
        }
        Ok(())
    }
}

struct FileSubscription {
    /// Moved into a blocking task while it reads.
    reader: Option<Reader>,
    commits: watch::Receiver<u64>,
}

impl FileSubscription {
    async fn read(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let mut reader = self.reader.take().ok_or(LogError::Closed)?;
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let r = reader.read(max);
            (reader, r)
        })
        .await
        .map_err(|e| LogError::Unavailable(format!("log reader task failed: {e}")))?;
        self.reader = Some(reader);
        result
    }
}

#[async_trait]
impl Subscription for FileSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.commits.borrow_and_update();
        let got = self.read(max).await?;
        if !got.is_empty() || wait.is_zero() {
            return Ok(got);
        }
        // Nothing yet: wait for the next group commit, or give up after `wait`.
        let _ = tokio::time::timeout(wait, self.commits.changed()).await;
        self.read(max).await
    }

    fn assigned(&self) -> Vec<u32> {
        let n = self.reader.as_ref().map_or(0, |r| r.positions.len());
        (0..n as u32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FromEarliest;
    use std::io::Write;

    fn opts(partitions: u32) -> FileLogOptions {
        FileLogOptions {
            partitions,
            segment_bytes: 4096,
            ..FileLogOptions::default()
        }
    }

    crate::event_log_conformance!(|dir: &std::path::Path| {
        FileLog::open(dir, opts(3))
            .map(|l| std::sync::Arc::new(l) as std::sync::Arc<dyn crate::EventLog>)
    });

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = FileLog::open(dir.path(), opts(1)).unwrap();
            log.append(vec![Record {
                key: b"k".to_vec(),
                payload: b"one".to_vec(),
            }])
            .await
            .unwrap();
        }
        // A crash mid-write leaves half a frame behind.
        let seg = dir
            .path()
            .join("partition-0000")
            .join(format!("{:020}.log", 0));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let log = FileLog::open(dir.path(), opts(1)).unwrap();
        log.append(vec![Record {
            key: b"k".to_vec(),
            payload: b"two".to_vec(),
        }])
        .await
        .unwrap();
        let mut sub = log.subscribe("g", Arc::new(FromEarliest)).await.unwrap();
        let got = sub.poll(10, Duration::ZERO).await.unwrap();
        let payloads: Vec<_> = got.iter().map(|d| d.payload.to_vec()).collect();
        assert_eq!(payloads, vec![b"one".to_vec(), b"two".to_vec()]);
    }

    #[tokio::test]
    async fn a_second_owner_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FileLog::open(dir.path(), opts(1)).unwrap();
        assert!(matches!(
            FileLog::open(dir.path(), opts(1)),
            Err(LogError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn a_changed_partition_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(FileLog::open(dir.path(), opts(2)).unwrap());
        assert!(matches!(
            FileLog::open(dir.path(), opts(3)),
            Err(LogError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_log_refuses_appends_as_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let log = FileLog::open(dir.path(), opts(1)).unwrap();
        log.close();
        let err = log
            .append(vec![Record {
                key: vec![],
                payload: vec![1],
            }])
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert!(log.check_ready().await.is_err());
    }
}
