//! The origin's records of the hand-overs it starts, kept in files under `state_dir` (a
//! tmpfs such as /run: they live as long as the pinned rules, until reboot).
//!
//! A record is written before a hand-over touches anything (its clients, its volunteer's
//! control addresses, the applications of this node that take part), and its verdict right
//! after it is decided. The kernel's rules remain the commit point: a record never decides a
//! hand-over, it only says which clients to read the rules of. So an agent killed in the
//! middle of one (between its IPv4 and IPv6 rules, say) finds the whole list when it starts
//! again, reads the rules for all of them, completes them, and answers everyone (its
//! applications, the volunteer) the same, whoever asks first. Decided records are kept for an
//! hour, then forgotten (the rules decide after that).

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{datapath::unix_now, peer::Verdict};

/// How long a decided hand-over is remembered (the rules decide after that).
pub(super) const REMEMBER: Duration = Duration::from_hours(1);

/// Hand-overs of one volunteer decided from the rules without a record of this node's (it asked
/// about one this node does not know) that are remembered; older ones are forgotten first. Each
/// question could otherwise leave a record in memory and in `state_dir` (a tmpfs) for an hour,
/// and a sibling can ask as often as it likes.
pub(super) const LEARNED_PER_VOLUNTEER: usize = 64;

/// Which way a hand-over moves clients (and their sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// From this node (the origin) to a volunteer: rules installed at the commit point.
    Out,
    /// From a volunteer back home: rules withdrawn at the commit point.
    Back,
}

/// A hand-over this node started as its origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub dir: Dir,
    pub volunteer: String,
    /// The volunteer's control addresses when it started (its rules' targets).
    pub targets: Vec<IpAddr>,
    pub clients: Vec<IpAddr>,
    /// This node's applications that take part: they export (out) or import (back).
    pub apps: Vec<SocketAddr>,
}

/// A record and how it ended (`Pending` until decided), with when it was decided.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub rec: Arc<Record>,
    pub verdict: Verdict,
    pub decided_unix: u64,
    /// Decided from the rules at a volunteer's question, without a record of this node's
    /// (as this run knows; a record read from a file counts as this node's).
    pub learned: bool,
}

#[derive(Serialize, Deserialize)]
struct VerdictFile {
    verdict: Verdict,
    decided_unix: u64,
}

/// The records, in memory and in their folder.
pub(super) struct Records {
    dir: PathBuf,
    by_id: HashMap<u64, Entry>,
}

pub(super) fn write_atomic(path: &Path, f: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    f(&mut w)?;
    w.flush().with_context(|| format!("writing {}", tmp.display()))?;
    drop(w);
    fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))
}

impl Records {
    /// Opens (making it, mode 0700) the folder `dir` and reads the records a previous run left;
    /// those decided more than [`REMEMBER`] ago are removed.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("making the hand-over records folder {}", dir.display()))?;
        let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        // Client addresses are nobody else's business.
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).with_context(|| format!("making {} private (0700)", dir.display()))?;
        }
        let mut r = Self { dir: dir.to_path_buf(), by_id: HashMap::new() };
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "json") {
                match r.read(&path) {
                    Ok(entry) => {
                        r.by_id.insert(entry.rec.id, entry);
                    }
                    Err(e) => warn!(file = %path.display(), "ignoring an unreadable hand-over record: {e:#}"),
                }
            }
        }
        r.forget_old();
        Ok(r)
    }

    fn read(&self, path: &Path) -> anyhow::Result<Entry> {
        let rec: Record = serde_json::from_slice(&fs::read(path)?).context("parsing")?;
        let (verdict, decided_unix) = match fs::read(self.verdict_path(rec.id)) {
            Ok(b) => {
                let v: VerdictFile = serde_json::from_slice(&b).context("parsing its verdict")?;
                (v.verdict, v.decided_unix)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Verdict::Pending, 0),
            Err(e) => return Err(e.into()),
        };
        Ok(Entry { rec: Arc::new(rec), verdict, decided_unix, learned: false })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn verdict_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.verdict"))
    }

    /// Records hand-over `rec` as started (pending), before it touches anything: a hand-over
    /// that cannot be recorded does not start.
    pub fn start(&mut self, rec: Record) -> anyhow::Result<Arc<Record>> {
        write_atomic(&self.path(rec.id), |w| serde_json::to_writer(w, &rec).context("encoding the record"))?;
        let rec = Arc::new(rec);
        self.by_id.insert(rec.id, Entry { rec: rec.clone(), verdict: Verdict::Pending, decided_unix: 0, learned: false });
        Ok(rec)
    }

    /// Records how hand-over `id` ended. An unknown one (decided without a record: it is older
    /// than the records, or they were lost) is recorded as `rec` from now on, with at most
    /// [`LEARNED_PER_VOLUNTEER`] of its volunteer's kept.
    pub fn decide(&mut self, rec: &Arc<Record>, verdict: Verdict) {
        let now = unix_now();
        let learned = !self.by_id.contains_key(&rec.id);
        if learned && let Err(e) = write_atomic(&self.path(rec.id), |w| serde_json::to_writer(w, rec.as_ref()).context("encoding the record")) {
            warn!(id = rec.id, "cannot write the record of a hand-over (remembered until the agent stops): {e:#}");
        }
        let file = VerdictFile { verdict, decided_unix: now };
        if let Err(e) = write_atomic(&self.verdict_path(rec.id), |w| serde_json::to_writer(w, &file).context("encoding the verdict")) {
            // Only the verdict is lost across a restart: the rules still say it then.
            warn!(id = rec.id, "cannot write how a hand-over ended (remembered until the agent stops; the rules say it after a restart): {e:#}");
        }
        let learned = learned || self.by_id.get(&rec.id).is_some_and(|e| e.learned);
        self.by_id.insert(rec.id, Entry { rec: rec.clone(), verdict, decided_unix: now, learned });
        if learned {
            self.forget_learned_beyond(&rec.volunteer, LEARNED_PER_VOLUNTEER);
        }
    }

    /// Forgets all but the `keep` newest hand-overs of `volunteer` learned from the rules.
    fn forget_learned_beyond(&mut self, volunteer: &str, keep: usize) {
        let mut learned: Vec<(u64, u64)> = self.by_id.values().filter(|e| e.learned && e.rec.volunteer == volunteer).map(|e| (e.decided_unix, e.rec.id)).collect();
        if learned.len() <= keep {
            return;
        }
        learned.sort_unstable();
        let n = learned.len() - keep;
        for (_, id) in learned.into_iter().take(n) {
            self.forget(id);
        }
    }

    /// Forgets hand-over `id` and removes its files.
    fn forget(&mut self, id: u64) {
        self.by_id.remove(&id);
        for p in [self.path(id), self.verdict_path(id)] {
            if let Err(e) = fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(file = %p.display(), "removing an old hand-over record: {e}");
            }
        }
    }

    /// Hand-over `id` and how it stands.
    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.by_id.get(&id)
    }

    /// Hand-overs started and not decided (by a previous run, when just opened).
    pub fn unfinished(&self) -> Vec<Arc<Record>> {
        let mut v: Vec<Arc<Record>> = self.by_id.values().filter(|e| e.verdict == Verdict::Pending).map(|e| e.rec.clone()).collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// How many hand-overs are undecided.
    pub fn undecided(&self) -> usize {
        self.by_id.values().filter(|e| e.verdict == Verdict::Pending).count()
    }

    /// Forgets (and removes the files of) hand-overs decided more than [`REMEMBER`] ago.
    pub fn forget_old(&mut self) {
        let cutoff = unix_now().saturating_sub(REMEMBER.as_secs());
        let old: Vec<u64> = self.by_id.values().filter(|e| e.verdict != Verdict::Pending && e.decided_unix < cutoff).map(|e| e.rec.id).collect();
        for id in old {
            self.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64) -> Record {
        Record {
            id,
            dir: Dir::Out,
            volunteer: "b".into(),
            targets: vec!["198.18.0.2".parse().unwrap()],
            clients: vec!["198.18.1.5".parse().unwrap(), "2001:db8:1::5".parse().unwrap()],
            apps: vec!["198.18.0.10:80".parse().unwrap()],
        }
    }

    #[test]
    fn records_outlive_the_agent_and_old_ones_go() {
        let dir = std::env::temp_dir().join(format!("redirector-records-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut r = Records::open(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let one = r.start(rec(1)).unwrap();
        r.start(Record { dir: Dir::Back, ..rec(2) }).unwrap();
        let three = r.start(rec(3)).unwrap();
        r.decide(&one, Verdict::Committed);
        r.decide(&three, Verdict::Aborted);
        // A later run sees every record as it was.
        let r = Records::open(&dir).unwrap();
        assert_eq!(r.get(1).map(|e| e.verdict), Some(Verdict::Committed));
        assert_eq!(r.get(3).map(|e| e.verdict), Some(Verdict::Aborted));
        assert_eq!(r.unfinished().iter().map(|x| (x.id, x.dir)).collect::<Vec<_>>(), [(2, Dir::Back)]);
        assert_eq!(*r.get(2).unwrap().rec, Record { dir: Dir::Back, ..rec(2) }, "the whole record, clients and all");
        // A verdict older than an hour is forgotten with its files; an undecided one is kept.
        let old = VerdictFile { verdict: Verdict::Committed, decided_unix: unix_now() - REMEMBER.as_secs() - 1 };
        fs::write(dir.join("1.verdict"), serde_json::to_vec(&old).unwrap()).unwrap();
        fs::write(dir.join("9.json"), b"not json").unwrap();
        let r = Records::open(&dir).unwrap();
        assert!(r.get(1).is_none() && !dir.join("1.json").exists() && !dir.join("1.verdict").exists());
        assert!(r.get(2).is_some() && r.get(3).is_some() && r.get(9).is_none(), "an unreadable file is ignored");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn questions_about_unknown_hand_overs_leave_a_bounded_number_of_records() {
        let dir = std::env::temp_dir().join(format!("redirector-records-learned-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut r = Records::open(&dir).unwrap();
        let own = r.start(rec(1)).unwrap();
        r.decide(&own, Verdict::Committed);
        // Sibling b asks about 200 hand-overs this node has no record of; c about one.
        for id in 1000..1200 {
            r.decide(&Arc::new(rec(id)), Verdict::Aborted);
        }
        r.decide(&Arc::new(Record { volunteer: "c".into(), ..rec(5000) }), Verdict::Aborted);
        let ids: Vec<u64> = r.by_id.keys().copied().filter(|id| (1000..1200).contains(id)).collect();
        assert_eq!(ids.len(), LEARNED_PER_VOLUNTEER, "at most {LEARNED_PER_VOLUNTEER} of b's");
        assert!(r.get(1199).is_some(), "the newest stay");
        assert!(r.get(1).is_some() && r.get(5000).is_some(), "this node's own records and another sibling's stay");
        let files = fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 2 * (LEARNED_PER_VOLUNTEER + 2), "and so do their files, no more");
        let _ = fs::remove_dir_all(&dir);
    }
}
