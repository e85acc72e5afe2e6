//! A TensorBoard event-file writer for scalars.
//!
//! Event files are TFRecord files of `tensorflow.Event` protobufs (tensorflow/core/util/event.proto):
//! each record is `[len: u64 LE][masked crc32c(len): u32 LE][data][masked crc32c(data): u32 LE]`.
//! We encode the few protobuf fields we need by hand: Event { wall_time = 1 (double),
//! step = 2 (int64), file_version = 3 (string), summary = 5 (Summary), session_log = 7
//! (SessionLog) }, Summary { value = 1 }, Summary.Value { tag = 1 (string), simple_value = 2
//! (float) }, SessionLog { status = 1 (enum, START = 1) }.
//!
//! Written here rather than through tensorboard-rs 0.5.9, which panics on I/O errors in its
//! background thread and names files by the second, so that a run resumed within the same
//! second truncates the previous file. Each writer here takes a name that no other file has.

use crate::error::{io_err, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct EventWriter {
    file: BufWriter<File>,
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing). The name is unique: a counter is
    /// appended when a file of the same time stamp already exists, and existing files are never
    /// opened for writing.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_string());
        let mut n = 0;
        let (file, path) = loop {
            let path = dir.join(format!(
                "events.out.tfevents.{secs}.{host}.{}.{n}",
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
            }
        };
        let mut w = EventWriter {
            file: BufWriter::new(file),
            path,
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        w.flush()?;
        Ok(w)
    }

    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let mut val = Vec::new();
        put_bytes(&mut val, 1, tag.as_bytes());
        put_fixed32(&mut val, 2, value.to_bits());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &val);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Marks a restart: readers drop the events of earlier files at steps >= `step` (a
    /// `SessionLog { status: START }` event, which TensorBoard's EventAccumulator purges on for
    /// file_version 2), so that a resumed run's repeated steps replace the old ones.
    pub fn add_session_start(&mut self, step: i64) -> Result<()> {
        let mut session_log = Vec::new();
        put_varint_field(&mut session_log, 1, 1); // status = START
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 7, &session_log);
        self.write_record(&event)
    }

    pub fn flush(&mut self) -> Result<()> {
        let path = self.path.display().to_string();
        self.file.flush().map_err(io_err(format!("writing {path}")))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        let path = self.path.display().to_string();
        self.file
            .write_all(&rec)
            .map_err(io_err(format!("writing {path}")))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(buf, u64::from(field) << 3);
    put_varint(buf, v);
}

fn put_double(buf: &mut Vec<u8>, field: u32, v: f64) {
    put_varint(buf, (u64::from(field) << 3) | 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_fixed32(buf: &mut Vec<u8>, field: u32, bits: u32) {
    put_varint(buf, (u64::from(field) << 3) | 5);
    buf.extend_from_slice(&bits.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(buf, (u64::from(field) << 3) | 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise; records are small and few.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// TFRecord's masked CRC: rotate right by 15 and add a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varint_encoding() {
        let mut b = Vec::new();
        put_varint(&mut b, 300);
        assert_eq!(b, vec![0xAC, 0x02]);
    }
}
