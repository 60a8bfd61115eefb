//! The sidecar's audit spool (issue 16): records wait here, on disk and in order, until the
//! control plane says they are durable. Records are chained as they are written
//! (`sigil_filters::audit`): the spool hands out each record's sequence number and the link of
//! the record before it, and keeps the chain's head across restarts.
//!
//! On disk: segment files `<first seq, 20 digits>.seg` in the spool directory, each a run of
//! frames `len (u32) | seq (u64) | prev (32 bytes) | record | check (the first 8 bytes of the
//! record's link)`, integers big-endian, and `acked` (the sequence number the control plane
//! acknowledged last). A frame is written with one `write` before `append` returns, so a
//! process killed at any point loses no record it appended (the kernel holds it); a torn
//! frame at the tail (power loss mid-write) fails its check and is cut off at open. `sync`
//! bounds what a power loss can take.
//!
//! Bounded: when a record would take the spool past its size, `FailOpen` drops the oldest
//! segment (its records not yet acknowledged are counted, for a record saying which were
//! lost) and `FailClosed` refuses the record (the caller refuses the connection). A segment
//! damaged in the middle is cut at the damage; the segments after it are kept, and the records
//! between are counted lost the same way.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sigil_filters::audit::{link, Hash, GENESIS};

const SEGMENT_SUFFIX: &str = ".seg";
const ACKED_FILE: &str = "acked";
/// The chain's ID, made with the spool.
const CHAIN_FILE: &str = "chain";
/// len + seq + prev + check.
const FRAME_OVERHEAD: u64 = 4 + 8 + 32 + 8;
/// A record larger than this is not a record this sidecar wrote.
const MAX_RECORD: usize = 1 << 20;

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Keep serving: drop the oldest records, counted.
    FailOpen,
    /// Refuse new records (and so new connections) until the control plane acknowledges.
    FailClosed,
}

/// Why a record was not spooled.
#[derive(Debug)]
pub enum SpoolError {
    /// `FailClosed`, and the spool is full.
    Full {
        max_bytes: u64,
    },
    Io(PathBuf, io::Error),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full { max_bytes } => write!(
                f,
                "the audit spool is full ({max_bytes} bytes) and fail-closed: waiting for the control plane to acknowledge"
            ),
            Self::Io(path, e) => write!(f, "{}: {e}", path.display()),
        }
    }
}

impl std::error::Error for SpoolError {}

struct Segment {
    path: PathBuf,
    first: u64,
    /// The last record in it (first - 1 while empty).
    last: u64,
    bytes: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    when_full: WhenFull,
    segments: VecDeque<Segment>,
    /// The newest segment, open for appending.
    current: File,
    next_seq: u64,
    head: Hash,
    acked: u64,
    /// Records lost (dropped when full in fail-open mode, or in a torn segment) and not yet
    /// reported: ranges of sequence numbers, oldest first.
    dropped: Vec<Lost>,
    /// This spool's chain ID (32 hex digits).
    chain: String,
}

/// Records `from..=through` that never reach the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    pub from: u64,
    pub through: u64,
}

impl Lost {
    pub fn count(&self) -> u64 {
        self.through - self.from + 1
    }
}

/// A spooled record: its sequence number, the link of the record before it, and its bytes.
pub type Spooled = (u64, Hash, Vec<u8>);

impl Spool {
    /// Opens the spool in `dir` (made if missing), recovering its records, chain head and
    /// acknowledged position; a torn frame at the tail is cut off.
    pub fn open(dir: &Path, max_bytes: u64, when_full: WhenFull) -> Result<Self, SpoolError> {
        let io_err = |p: &Path| {
            let p = p.to_path_buf();
            move |e| SpoolError::Io(p, e)
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let chain_path = dir.join(CHAIN_FILE);
        let chain = match std::fs::read_to_string(&chain_path) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let chain = sigil_filters::audit::new_chain_id();
                std::fs::write(&chain_path, format!("{chain}\n"))
                    .and_then(|()| File::open(&chain_path).and_then(|f| f.sync_all()))
                    .map_err(io_err(&chain_path))?;
                chain
            }
            Err(e) => return Err(SpoolError::Io(chain_path, e)),
        };
        let acked_path = dir.join(ACKED_FILE);
        let acked = match std::fs::read_to_string(&acked_path) {
            Ok(text) => text.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(SpoolError::Io(acked_path, e)),
        };
        let mut firsts: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(first) = first {
                firsts.push((first, path));
            }
        }
        firsts.sort();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut dropped = Vec::new();
        let (mut next_seq, mut head) = (acked + 1, GENESIS);
        for (first, path) in firsts {
            let scan = scan(&path).map_err(io_err(&path))?;
            if scan.valid_bytes < scan.file_bytes {
                // A torn frame: at the tail of the newest segment after a power loss, or
                // anywhere after damage. What follows it in this segment cannot be read;
                // the later segments are kept, and the records between are counted lost.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(scan.valid_bytes).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            let last = scan.last.map_or(first - 1, |(seq, _)| seq);
            if let Some(before) = segments.back() {
                let from = (before.last + 1).max(acked + 1);
                if first > from {
                    dropped.push(Lost {
                        from,
                        through: first - 1,
                    });
                }
            }
            if let Some((seq, link_of_last)) = scan.last {
                next_seq = seq + 1;
                head = link_of_last;
            }
            segments.push_back(Segment {
                path,
                first,
                last,
                bytes: scan.valid_bytes,
            });
        }
        // Never at or below what the control plane acknowledged (a tail cut after it was
        // shipped): those numbers are taken there, and the cursor starts after them.
        next_seq = next_seq.max(acked + 1);
        if segments.is_empty() {
            segments.push_back(new_segment(dir, next_seq).map_err(io_err(dir))?);
        }
        let last = segments.back().expect("one at least");
        let current = OpenOptions::new()
            .append(true)
            .open(&last.path)
            .map_err(io_err(&last.path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).max(64 * 1024),
            when_full,
            segments,
            current,
            next_seq,
            head,
            acked,
            dropped,
            chain,
        })
    }

    /// This spool's chain ID.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Appends the record `make` encodes for its sequence number and the link of the record
    /// before it; returns its sequence number once the kernel holds it.
    pub fn append(&mut self, make: impl FnOnce(u64, &Hash) -> Vec<u8>) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        let record = make(seq, &self.head);
        let frame_len = FRAME_OVERHEAD + record.len() as u64;
        while self.bytes() + frame_len > self.max_bytes {
            match self.when_full {
                WhenFull::FailClosed => {
                    return Err(SpoolError::Full {
                        max_bytes: self.max_bytes,
                    })
                }
                WhenFull::FailOpen => {
                    if !self.drop_oldest()? {
                        break;
                    }
                }
            }
        }
        if self
            .segments
            .back()
            .is_some_and(|s| s.bytes > 0 && s.bytes + frame_len > self.segment_bytes)
        {
            let segment =
                new_segment(&self.dir, seq).map_err(|e| SpoolError::Io(self.dir.clone(), e))?;
            self.current = OpenOptions::new()
                .append(true)
                .open(&segment.path)
                .map_err(|e| SpoolError::Io(segment.path.clone(), e))?;
            self.segments.push_back(segment);
        }
        let link = link(seq, &self.head, &record);
        let mut frame = Vec::with_capacity(frame_len as usize);
        frame.extend_from_slice(&(record.len() as u32).to_be_bytes());
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.extend_from_slice(&self.head);
        frame.extend_from_slice(&record);
        frame.extend_from_slice(&link[..8]);
        let segment = self.segments.back_mut().expect("one at least");
        if let Err(e) = self.current.write_all(&frame) {
            // A frame half written (a full disk) must not stay in front of the next ones.
            let _ = self.current.set_len(segment.bytes);
            return Err(SpoolError::Io(segment.path.clone(), e));
        }
        segment.bytes += frame_len;
        segment.last = seq;
        self.head = link;
        self.next_seq = seq + 1;
        Ok(seq)
    }

    /// Drops the oldest segment (never the one being written); false if there is none to
    /// drop. Its records not yet acknowledged are counted as dropped.
    fn drop_oldest(&mut self) -> Result<bool, SpoolError> {
        if self.segments.len() < 2 {
            return Ok(false);
        }
        let oldest = self.segments.pop_front().expect("two at least");
        self.lose(oldest.first.max(self.acked + 1), oldest.last);
        std::fs::remove_file(&oldest.path).map_err(|e| SpoolError::Io(oldest.path.clone(), e))?;
        Ok(true)
    }

    /// Makes what was appended survive a power loss.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let path = &self.segments.back().expect("one at least").path;
        self.current
            .sync_data()
            .map_err(|e| SpoolError::Io(path.clone(), e))
    }

    /// Where shipping starts: the first record not acknowledged.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            seq: self.acked + 1,
            segment: 0,
            offset: 0,
        }
    }

    /// The byte ranges that hold the records from `cursor` on, for `read` to read without
    /// the spool's lock: appends go past them and never change them.
    pub fn plan(&self, cursor: &Cursor) -> Vec<Part> {
        self.segments
            .iter()
            .filter(|s| s.last >= cursor.seq)
            .map(|s| Part {
                path: s.path.clone(),
                segment: s.first,
                from: if s.first == cursor.segment {
                    cursor.offset
                } else {
                    0
                },
                to: s.bytes,
            })
            .filter(|p| p.from < p.to)
            .collect()
    }

    /// The control plane holds every record up to `through`, and `write_acked` has noted it:
    /// the segments it covers leave the list, and their files are returned for removal. The
    /// segment holding the newest record stays, so that the chain's head survives a restart.
    pub fn trim(&mut self, through: u64) -> Vec<PathBuf> {
        self.acked = self.acked.max(through.min(self.next_seq - 1));
        let mut gone = Vec::new();
        while self.segments.len() > 1
            && self.segments[0].last <= self.acked
            && self.segments.iter().skip(1).any(|s| s.last >= s.first)
        {
            gone.push(self.segments.pop_front().expect("checked").path);
        }
        gone
    }

    /// The spool's directory (for `write_acked`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Notes records `from..=through` as lost, joined to the range before if it adjoins (and
    /// again, a range whose `Dropped` record found no room).
    pub fn lose(&mut self, from: u64, through: u64) {
        if from > through {
            return;
        }
        match self.dropped.last_mut() {
            Some(last) if last.through + 1 == from => last.through = through,
            _ => self.dropped.push(Lost { from, through }),
        }
    }

    /// The records lost since the last call, for `Dropped` records to say so.
    pub fn take_dropped(&mut self) -> Vec<Lost> {
        std::mem::take(&mut self.dropped)
    }

    /// The next record's sequence number, and the chain's head.
    pub fn position(&self) -> (u64, Hash) {
        (self.next_seq, self.head)
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The size it keeps to.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

/// Where the shipper is: the next record to read, and the segment (by its first sequence
/// number) and byte offset it stopped at, so that no frame is read twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub seq: u64,
    segment: u64,
    offset: u64,
}

/// A byte range of one segment file.
pub struct Part {
    path: PathBuf,
    segment: u64,
    from: u64,
    to: u64,
}

/// Up to `max` records from `cursor` on, in order, from the ranges `Spool::plan` gave; moves
/// the cursor past them. A segment removed meanwhile (fail-open, full) is skipped: its records
/// are the ones a `Dropped` record counts. Each segment read from is synced to the disk first:
/// a record leaves for the control plane only once a power loss cannot take it from here, so
/// that this spool never numbers a new record with a number the control plane already holds.
pub fn read(parts: &[Part], cursor: &mut Cursor, max: usize) -> Result<Vec<Spooled>, SpoolError> {
    use std::io::{Seek, SeekFrom};
    let mut out = Vec::new();
    for part in parts {
        let io_err = |e| SpoolError::Io(part.path.clone(), e);
        let mut file = match File::open(&part.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        };
        file.sync_data().map_err(io_err)?;
        file.seek(SeekFrom::Start(part.from)).map_err(io_err)?;
        let mut bytes = vec![0; (part.to - part.from) as usize];
        file.read_exact(&mut bytes).map_err(io_err)?;
        let mut at = 0;
        while let Some((frame, end)) = parse_frame(&bytes, at) {
            if out.len() == max {
                return Ok(out);
            }
            at = end;
            cursor.segment = part.segment;
            cursor.offset = part.from + end as u64;
            if frame.0 >= cursor.seq {
                cursor.seq = frame.0 + 1;
                out.push(frame);
            }
        }
    }
    Ok(out)
}

/// Notes that the control plane holds every record up to `through`; done before
/// `Spool::trim` and without the spool's lock. Not synced to the disk: after a power loss the
/// note may be older (or gone), and the records after it, which `read` synced before they
/// were sent, are sent again with the same bytes and stored once. An acknowledgement costs no
/// `fsync`.
pub fn write_acked(dir: &Path, through: u64) -> Result<(), SpoolError> {
    let path = dir.join(ACKED_FILE);
    let tmp = dir.join(format!("{ACKED_FILE}.tmp"));
    std::fs::write(&tmp, format!("{through}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| SpoolError::Io(path, e))
}

fn new_segment(dir: &Path, first: u64) -> io::Result<Segment> {
    let path = dir.join(format!("{first:020}{SEGMENT_SUFFIX}"));
    OpenOptions::new().create(true).append(true).open(&path)?;
    if let Ok(d) = File::open(dir) {
        d.sync_all()?;
    }
    Ok(Segment {
        path,
        first,
        last: first - 1,
        bytes: 0,
    })
}

struct Scan {
    file_bytes: u64,
    /// Up to the end of the last whole, checked frame.
    valid_bytes: u64,
    /// The last frame's sequence number and link.
    last: Option<(u64, Hash)>,
}

fn scan(path: &Path) -> io::Result<Scan> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut at = 0usize;
    let mut last = None;
    while let Some((frame, end)) = parse_frame(&bytes, at) {
        last = Some((frame.0, link(frame.0, &frame.1, &frame.2)));
        at = end;
    }
    Ok(Scan {
        file_bytes: bytes.len() as u64,
        valid_bytes: at as u64,
        last,
    })
}

/// The frame at `at` and where it ends, if it is whole and its check holds.
fn parse_frame(bytes: &[u8], at: usize) -> Option<(Spooled, usize)> {
    let len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let seq = u64::from_be_bytes(bytes.get(at + 4..at + 12)?.try_into().ok()?);
    let prev: Hash = bytes.get(at + 12..at + 44)?.try_into().ok()?;
    let record = bytes.get(at + 44..at + 44 + len)?;
    let check = bytes.get(at + 44 + len..at + 52 + len)?;
    if link(seq, &prev, record)[..8] != *check {
        return None;
    }
    Some(((seq, prev, record.to_vec()), at + 52 + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_config::SpiffeId;
    use sigil_filters::audit::{verify, Entry};

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("sigil-spool-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Self(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(seq: u64) -> Vec<u8> {
        format!("connection {seq} closed normally after {} bytes", seq * 100).into_bytes()
    }

    impl Spool {
        fn read_from(&self, seq: u64, max: usize) -> Result<Vec<Spooled>, SpoolError> {
            let mut cursor = Cursor {
                seq,
                segment: 0,
                offset: 0,
            };
            read(&self.plan(&cursor), &mut cursor, max)
        }

        fn ack(&mut self, through: u64) -> Result<(), SpoolError> {
            write_acked(&self.dir, through)?;
            for path in self.trim(through) {
                std::fs::remove_file(&path).map_err(|e| SpoolError::Io(path, e))?;
            }
            Ok(())
        }
    }

    fn append_n(s: &mut Spool, n: u64) {
        for _ in 0..n {
            s.append(|seq, _| record(seq)).unwrap();
        }
    }

    /// The records in order and whole as a chain from `start`.
    fn assert_chain(records: &[Spooled], start: Option<(u64, Hash)>) {
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let entries: Vec<Entry<'_>> = records
            .iter()
            .map(|(seq, prev, r)| Entry {
                seq: *seq,
                prev: *prev,
                record: r,
            })
            .collect();
        assert_eq!(verify(&id, &entries, &[], start, &[]), []);
    }

    #[test]
    fn records_survive_a_reopen_in_order_and_the_chain_goes_on() {
        let dir = Dir::new("reopen");
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        append_n(&mut s, 3000);
        let position = s.position();
        drop(s);
        let chain = std::fs::read_to_string(dir.0.join(CHAIN_FILE)).unwrap();
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        assert_eq!(s.position(), position);
        assert_eq!(s.chain(), chain.trim(), "the chain keeps its ID");
        assert_eq!(s.chain().len(), 32);
        append_n(&mut s, 10);
        let all = s.read_from(1, usize::MAX).unwrap();
        assert_eq!(all.len(), 3010);
        assert_chain(&all, None);
        assert!(s.segments.len() > 1, "segments rolled over");
        assert_eq!(
            s.read_from(3005, 3)
                .unwrap()
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            [3005, 3006, 3007]
        );
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_chain_resumes_from_the_last_whole_record() {
        let dir = Dir::new("torn");
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        append_n(&mut s, 5);
        let path = s.segments.back().unwrap().path.clone();
        drop(s);
        // A frame cut short, as a power loss mid-write leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 6, 1, 2, 3])
            .unwrap();
        drop(f);
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        assert_eq!(s.position().0, 6);
        append_n(&mut s, 2);
        let all = s.read_from(1, usize::MAX).unwrap();
        assert_eq!(
            all.iter().map(|r| r.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7]
        );
        assert_chain(&all, None);
    }

    #[test]
    fn a_segment_damaged_in_the_middle_keeps_the_later_ones_and_counts_what_is_lost() {
        let dir = Dir::new("middle");
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        append_n(&mut s, 5000);
        assert!(s.segments.len() >= 3);
        let (first, middle, next) = {
            let m = &s.segments[1];
            (m.first, m.path.clone(), s.segments[2].first)
        };
        let position = s.position();
        drop(s);
        // One byte changed in the middle segment's 10th frame.
        let mut bytes = std::fs::read(&middle).unwrap();
        let at = (0..9).fold(0, |at, _| {
            at + 52 + u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize
        });
        bytes[at + 50] ^= 1;
        std::fs::write(&middle, bytes).unwrap();
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        assert_eq!(s.position(), position, "the later segments are kept");
        assert_eq!(
            s.take_dropped(),
            [Lost {
                from: first + 9,
                through: next - 1
            }]
        );
        let all = s.read_from(1, usize::MAX).unwrap();
        assert_eq!(all.len() as u64, 5000 - (next - first - 9));
        assert_eq!(all.last().unwrap().0, 5000);
    }

    #[test]
    fn acknowledged_segments_leave_and_the_position_is_kept() {
        let dir = Dir::new("ack");
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        append_n(&mut s, 3000);
        let before = s.bytes();
        s.ack(2500).unwrap();
        assert!(s.bytes() < before, "acknowledged segments removed");
        drop(s);
        let s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        assert_eq!(s.acked(), 2500);
        assert_eq!(s.position().0, 3001);
        let rest = s.read_from(2501, usize::MAX).unwrap();
        assert_eq!(rest.len(), 500);
        assert_eq!(rest[0].0, 2501);
    }

    #[test]
    fn a_cursor_reads_each_record_once_while_appends_go_on() {
        let dir = Dir::new("cursor");
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        let mut cursor = s.cursor();
        let mut seen = Vec::new();
        for round in 0..40u64 {
            append_n(&mut s, 97 + round);
            let parts = s.plan(&cursor);
            // Appended after the plan: not in this read, in the next.
            append_n(&mut s, 3);
            seen.extend(read(&parts, &mut cursor, 150).unwrap());
        }
        seen.extend(read(&s.plan(&cursor), &mut cursor, usize::MAX).unwrap());
        let total = s.position().0 - 1;
        assert!(s.segments.len() > 1, "segments rolled over");
        assert_eq!(
            seen.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=total).collect::<Vec<_>>()
        );
        assert_chain(&seen, None);
        assert!(s.plan(&cursor).is_empty(), "nothing left to read");
    }

    #[test]
    fn trimming_keeps_the_chain_head_across_a_restart() {
        let dir = Dir::new("head");
        let mut s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        append_n(&mut s, 2000);
        // A newest segment with no record yet (its first write failed).
        let empty = new_segment(&s.dir, s.next_seq).unwrap();
        s.segments.push_back(empty);
        s.ack(2000).unwrap();
        let position = s.position();
        drop(s);
        let s = Spool::open(&dir.0, 1 << 20, WhenFull::FailOpen).unwrap();
        assert_eq!(s.position(), position, "the head is not lost");
    }

    #[test]
    fn full_fail_open_drops_the_oldest_and_counts_them_exactly() {
        let dir = Dir::new("open");
        let max = 600 * 1024;
        let mut s = Spool::open(&dir.0, max, WhenFull::FailOpen).unwrap();
        append_n(&mut s, 20_000);
        assert!(s.bytes() <= max);
        let kept = s.read_from(1, usize::MAX).unwrap();
        let lost = s.take_dropped();
        assert_eq!(lost.len(), 1, "one range, joined: {lost:?}");
        assert_eq!(lost[0].from, 1);
        assert_eq!(
            lost[0].through + 1,
            kept[0].0,
            "exactly the records not kept"
        );
        assert_eq!(kept.last().unwrap().0, 20_000);
        let start = kept[0].0 - 1;
        assert_chain(&kept, Some((start, kept[0].1)));
        assert_eq!(s.take_dropped(), [], "reported once");
    }

    #[test]
    fn full_fail_closed_refuses_until_acknowledged() {
        let dir = Dir::new("closed");
        let max = 600 * 1024;
        let mut s = Spool::open(&dir.0, max, WhenFull::FailClosed).unwrap();
        let mut appended = 0u64;
        let refused = loop {
            match s.append(|seq, _| record(seq)) {
                Ok(_) => appended += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(refused, SpoolError::Full { .. }), "{refused}");
        assert!(refused.to_string().contains("fail-closed"));
        assert_eq!(s.position().0, appended + 1, "nothing skipped");
        s.ack(appended / 2).unwrap();
        s.append(|seq, _| record(seq)).expect("room again");
        assert_eq!(s.take_dropped(), []);
        let all = s.read_from(1, usize::MAX).unwrap();
        assert_eq!(all.last().unwrap().0, appended + 1);
    }
}
