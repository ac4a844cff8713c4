//! One advisory lock per key (flock through `std::fs::File::lock`): the kernel releases it when
//! its holder dies, and the holder's pid written inside tells us when that happened.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{CacheError, Result, io_err};
use crate::store::{hostname, process_alive};

/// A held lock; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    file: File,
    path: PathBuf,
    /// Set when the previous holder died without releasing: who it was.
    pub broken_from: Option<String>,
}

impl KeyLock {
    pub(crate) fn acquire(
        path: &Path,
        timeout: Duration,
        on_wait: &mut dyn FnMut(&str),
    ) -> Result<KeyLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, "open the lock file", e))?;
        let start = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = read_holder(&mut file);
                    if start.elapsed() >= timeout {
                        return Err(CacheError::LockTimeout {
                            path: path.to_path_buf(),
                            holder,
                            waited: start.elapsed(),
                        });
                    }
                    if !told {
                        on_wait(&holder);
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_err(path, "lock", e));
                }
            }
        }
        // A holder that released cleanly truncated the file; text left means it died holding it.
        let previous = read_holder(&mut file);
        let broken_from = if previous.is_empty() {
            None
        } else {
            let pid = previous
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
                .unwrap_or(0);
            let same_host = previous.split_whitespace().nth(3) == Some(hostname().as_str());
            if same_host && process_alive(pid) && pid as u32 != std::process::id() {
                // Reused pid, or a clean holder that has not truncated yet: nothing to report.
                None
            } else {
                Some(previous)
            }
        };
        let me = format!("pid {} host {}", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| io_err(path, "write the lock file", e))?;
        Ok(KeyLock {
            file,
            path: path.to_path_buf(),
            broken_from,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut s);
    let s = s.trim().to_string();
    if s.is_empty() { String::new() } else { s }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
