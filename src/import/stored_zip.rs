//! A strict reader for the zip archives `torch.save` writes: every entry stored (method 0),
//! one disk, no encryption, read from a byte slice without copying.
//!
//! Why our own reader and not the `zip` crate: `torch.save` (PyTorch's `PyTorchFileWriter`,
//! built on miniz with its zip64 flag) always ends an archive with a zip64 end record and
//! locator, even when every field fits the 32-bit end record, so 76 bytes sit between the
//! central directory and the end record. `zip` 9.8.1 takes the central directory to start
//! `cd_size` bytes before the end record when a header signature is found there (it assumes
//! that data may have been prepended). In a torch file that point is 76 bytes into the central
//! directory, which holds a header exactly when the first entry's header is 76 bytes long:
//! `<root>/data.pkl` with a 21-character root name (46 + 21 + 9). So every probe file whose
//! stem is 21 characters long was refused. A reader with no repair heuristics follows the
//! offsets the archive states, and needs none of the codecs, so it is small:
//! end record (with its zip64 record when present), central directory, local headers.
//!
//! Safety: nothing is allocated from a size the file states before that size is checked
//! against the file's length (the entry list is bounded by the central directory's size, 46
//! bytes per header at least), and entries are borrowed slices of the input.

use std::collections::HashMap;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZipError {
    #[error("no end-of-central-directory record in the last 64 KiB ({len} bytes in all)")]
    NoEndRecord { len: usize },
    #[error("{0}")]
    Corrupt(String),
    #[error("entry {entry}: {what}")]
    Unsupported { entry: String, what: String },
    #[error("no entry {0}")]
    Missing(String),
    #[error("entry {entry}: CRC-32 is {found:08x}, the archive says {expected:08x}")]
    Crc { entry: String, expected: u32, found: u32 },
}

const END_SIG: u32 = 0x0605_4b50;
const ZIP64_END_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const END_LEN: usize = 22;
const ZIP64_LOCATOR_LEN: usize = 20;
/// The zip64 end record's fixed part, signature and size field included.
const ZIP64_END_LEN: usize = 56;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;
/// Zip64 extended information extra field.
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// One stored entry: where its bytes are and the CRC-32 the archive records for them.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    data: Range<usize>,
    crc: u32,
}

/// An archive parsed from bytes in memory.
#[derive(Debug)]
pub struct StoredZip<'a> {
    bytes: &'a [u8],
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

/// Little-endian fields of `bytes` at fixed offsets; the caller checks the length first.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }
}

fn corrupt(reason: String) -> ZipError {
    ZipError::Corrupt(reason)
}

/// `bytes[at..at + len]`, or an error naming `what` when the file is too short for it.
fn region(bytes: &[u8], at: u64, len: u64, what: &str) -> Result<Range<usize>, ZipError> {
    match at.checked_add(len) {
        Some(end) if end <= bytes.len() as u64 => Ok(at as usize..end as usize),
        _ => Err(corrupt(format!(
            "{what} at byte {at} ({len} bytes) runs past the end of the file ({} bytes)",
            bytes.len()
        ))),
    }
}

/// The archive-wide facts from the end record (and its zip64 record when there is one).
struct Directory {
    entries: u64,
    offset: u64,
    size: u64,
    /// Where the central directory must end: at the zip64 end record, or at the end record.
    end: u64,
}

impl<'a> StoredZip<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ZipError> {
        let dir = find_directory(bytes)?;
        // Each central header takes 46 bytes at least: this bounds the list by the file.
        if dir.entries > dir.size / CENTRAL_LEN as u64 {
            return Err(corrupt(format!(
                "the end record lists {} entries, more than a central directory of {} bytes can hold",
                dir.entries, dir.size
            )));
        }
        let mut entries = Vec::with_capacity(dir.entries as usize);
        let mut by_name = HashMap::with_capacity(dir.entries as usize);
        let mut at = dir.offset;
        for index in 0..dir.entries {
            let (entry, next) = central_entry(bytes, at, dir.offset, dir.end, index)?;
            if by_name.insert(entry.name.clone(), entries.len()).is_some() {
                return Err(corrupt(format!("entry {} appears twice", entry.name)));
            }
            entries.push(entry);
            at = next;
        }
        if at != dir.end {
            return Err(corrupt(format!(
                "the central directory's {} entries end at byte {at}, but it runs to byte {}",
                dir.entries, dir.end
            )));
        }
        Ok(Self { bytes, entries, by_name })
    }

    /// Entry names in the archive's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// Length in bytes of entry `name`, without reading it.
    pub fn size(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).map(|&i| self.entries[i].data.len())
    }

    /// The bytes of entry `name`, after checking them against their CRC-32.
    pub fn read(&self, name: &str) -> Result<&'a [u8], ZipError> {
        let entry = &self.entries[*self.by_name.get(name).ok_or_else(|| ZipError::Missing(name.into()))?];
        let data = &self.bytes[entry.data.clone()];
        let found = crc32fast::hash(data);
        if found != entry.crc {
            return Err(ZipError::Crc { entry: entry.name.clone(), expected: entry.crc, found });
        }
        Ok(data)
    }
}

fn find_directory(bytes: &[u8]) -> Result<Directory, ZipError> {
    // The end record is the last thing in the file but for a comment of up to 64 KiB: the
    // last signature whose comment length reaches exactly to the end is it.
    let len = bytes.len();
    let lowest = len.saturating_sub(END_LEN + u16::MAX as usize);
    let end_at = (lowest..=len.saturating_sub(END_LEN))
        .rev()
        .filter(|&at| at + END_LEN <= len)
        .find(|&at| {
            let f = Fields(&bytes[at..]);
            f.u32(0) == END_SIG && at + END_LEN + f.u16(20) as usize == len
        })
        .ok_or(ZipError::NoEndRecord { len })?;
    let end = Fields(&bytes[end_at..]);
    if end.u16(4) != 0 || end.u16(6) != 0 || end.u16(8) != end.u16(10) {
        return Err(corrupt("a multi-disk archive (torch.save writes one disk)".into()));
    }
    let (entries32, size32, offset32) = (end.u16(10), end.u32(12), end.u32(16));

    let has_locator =
        end_at >= ZIP64_LOCATOR_LEN && Fields(&bytes[end_at - ZIP64_LOCATOR_LEN..]).u32(0) == ZIP64_LOCATOR_SIG;
    if !has_locator {
        if entries32 == u16::MAX || size32 == u32::MAX || offset32 == u32::MAX {
            return Err(corrupt("the end record defers to a zip64 record, but there is no zip64 locator".into()));
        }
        return Ok(Directory {
            entries: entries32.into(),
            offset: offset32.into(),
            size: size32.into(),
            end: end_at as u64,
        });
    }

    let locator_at = end_at - ZIP64_LOCATOR_LEN;
    let locator = Fields(&bytes[locator_at..]);
    if locator.u32(4) != 0 || locator.u32(16) > 1 {
        return Err(corrupt("a multi-disk zip64 archive (torch.save writes one disk)".into()));
    }
    let record_at = locator.u64(8);
    let record = region(bytes, record_at, ZIP64_END_LEN as u64, "the zip64 end record")?;
    let record = Fields(&bytes[record]);
    if record.u32(0) != ZIP64_END_SIG {
        return Err(corrupt(format!("no zip64 end record at byte {record_at}, where the locator points")));
    }
    // The record (12 bytes of signature and size, then its stated size) ends at the locator.
    if record_at.checked_add(12).and_then(|x| x.checked_add(record.u64(4))) != Some(locator_at as u64) {
        return Err(corrupt(format!(
            "the zip64 end record at byte {record_at} states {} bytes, which do not reach its locator at byte {locator_at}",
            record.u64(4)
        )));
    }
    if record.u32(16) != 0 || record.u32(20) != 0 || record.u64(24) != record.u64(32) {
        return Err(corrupt("a multi-disk zip64 archive (torch.save writes one disk)".into()));
    }
    let (entries, size, offset) = (record.u64(32), record.u64(40), record.u64(48));
    // Where the 32-bit field is not saturated it must say the same as the zip64 one.
    let agree = [
        ("entry count", entries32 == u16::MAX || u64::from(entries32) == entries, u64::from(entries32), entries),
        ("directory size", size32 == u32::MAX || u64::from(size32) == size, u64::from(size32), size),
        ("directory offset", offset32 == u32::MAX || u64::from(offset32) == offset, u64::from(offset32), offset),
    ];
    if let Some((field, _, short, long)) = agree.into_iter().find(|(_, ok, _, _)| !ok) {
        return Err(corrupt(format!("the end record's {field} is {short} but the zip64 record's is {long}")));
    }
    Ok(Directory { entries, offset, size, end: record_at })
}

fn central_entry(bytes: &[u8], at: u64, dir_start: u64, dir_end: u64, index: u64) -> Result<(Entry, u64), ZipError> {
    let what = format!("central directory header {index}");
    let header = region(bytes, at, CENTRAL_LEN as u64, &what)?;
    if header.end as u64 > dir_end {
        return Err(corrupt(format!("{what} at byte {at} runs past the central directory's end (byte {dir_end})")));
    }
    let f = Fields(&bytes[header]);
    if f.u32(0) != CENTRAL_SIG {
        return Err(corrupt(format!("no {what} at byte {at}")));
    }
    let (flags, method, crc) = (f.u16(8), f.u16(10), f.u32(16));
    let (name_len, extra_len, comment_len) = (f.u16(28) as u64, f.u16(30) as u64, f.u16(32) as u64);
    let next = at + CENTRAL_LEN as u64 + name_len + extra_len + comment_len;
    if next > dir_end {
        return Err(corrupt(format!("{what} at byte {at} runs past the central directory's end (byte {dir_end})")));
    }
    let name_at = at as usize + CENTRAL_LEN;
    let raw_name = &bytes[name_at..name_at + name_len as usize];
    let name = String::from_utf8_lossy(raw_name).into_owned();
    let extra = &bytes[name_at + name_len as usize..name_at + (name_len + extra_len) as usize];

    let unsupported = |what: String| ZipError::Unsupported { entry: name.clone(), what };
    if flags & 1 != 0 {
        return Err(unsupported("encrypted".into()));
    }
    if method != 0 {
        return Err(unsupported(format!("compressed (method {method}); torch.save stores entries uncompressed")));
    }
    let (mut size, mut compressed, mut local_at) = (u64::from(f.u32(24)), u64::from(f.u32(20)), u64::from(f.u32(42)));
    if size == u64::from(u32::MAX) || compressed == u64::from(u32::MAX) || local_at == u64::from(u32::MAX) {
        // The zip64 extra holds, in this order, each field whose 32-bit value is saturated.
        let mut values = zip64_extra(extra).ok_or_else(|| {
            corrupt(format!("{what} ({name}) defers its sizes to a zip64 extra field it does not have"))
        })?;
        for field in [&mut size, &mut compressed, &mut local_at] {
            if *field == u64::from(u32::MAX) {
                *field = values
                    .next()
                    .ok_or_else(|| corrupt(format!("{what} ({name}): its zip64 extra field is too short")))?;
            }
        }
    }
    if compressed != size {
        return Err(corrupt(format!("{what} ({name}): stored, but {compressed} bytes hold {size}")));
    }

    // The local header repeats the name, then its own extra field (torch.save pads there to
    // align the data), then the data; all of it before the central directory.
    let local = region(bytes, local_at, LOCAL_LEN as u64, &format!("the local header of {name}"))?;
    let l = Fields(&bytes[local.clone()]);
    if l.u32(0) != LOCAL_SIG {
        return Err(corrupt(format!("no local header for {name} at byte {local_at}")));
    }
    let data_at = local_at + LOCAL_LEN as u64 + u64::from(l.u16(26)) + u64::from(l.u16(28));
    let local_name = region(bytes, local.end as u64, u64::from(l.u16(26)), &format!("the local header of {name}"))?;
    if &bytes[local_name] != raw_name {
        return Err(corrupt(format!("the local header at byte {local_at} names another entry than {name}")));
    }
    let data = region(bytes, data_at, size, &format!("the data of {name}"))?;
    if data.end as u64 > dir_start {
        return Err(corrupt(format!(
            "the data of {name} ({size} bytes at byte {data_at}) runs into the central directory"
        )));
    }
    Ok((Entry { name, data, crc }, next))
}

/// The 8-byte values of the zip64 extended information field in `extra`, if there is one.
fn zip64_extra(extra: &[u8]) -> Option<impl Iterator<Item = u64> + '_> {
    let mut rest = extra;
    while rest.len() >= 4 {
        let (id, len) = (u16::from_le_bytes([rest[0], rest[1]]), u16::from_le_bytes([rest[2], rest[3]]) as usize);
        let body = rest.get(4..4 + len)?;
        if id == ZIP64_EXTRA_ID {
            return Some(body.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))));
        }
        rest = &rest[4 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored archive the way miniz writes it for torch.save: each data start padded to 64
    /// bytes through a local extra field, then the central directory, and (with `zip64`) a
    /// zip64 end record and locator before an end record whose fields all fit.
    fn archive(entries: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        archive_with(entries, zip64, false)
    }

    /// [`archive`], and with `zip64_extras` every central header saturates its sizes and
    /// offset and gives them in a zip64 extra field, as a writer does past 4 GiB.
    fn archive_with(entries: &[(&str, &[u8])], zip64: bool, zip64_extras: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let local_at = out.len() as u32;
            let unpadded = out.len() + LOCAL_LEN + name.len() + 4;
            let pad = (64 - unpadded % 64) % 64;
            let crc = crc32fast::hash(data);
            out.extend(LOCAL_SIG.to_le_bytes());
            out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend(crc.to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(((pad + 4) as u16).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(b"FB");
            out.extend((pad as u16).to_le_bytes());
            out.extend(std::iter::repeat_n(b'Z', pad));
            assert_eq!(out.len() % 64, 0);
            out.extend(*data);
            let (size, at) = if zip64_extras { (u32::MAX, u32::MAX) } else { (data.len() as u32, local_at) };
            central.extend(CENTRAL_SIG.to_le_bytes());
            central.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            central.extend(crc.to_le_bytes());
            central.extend(size.to_le_bytes());
            central.extend(size.to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend((if zip64_extras { 4u16 + 24 } else { 0 }).to_le_bytes());
            central.extend([0u8; 10]);
            central.extend(at.to_le_bytes());
            central.extend(name.as_bytes());
            if zip64_extras {
                central.extend(ZIP64_EXTRA_ID.to_le_bytes());
                central.extend(24u16.to_le_bytes());
                central.extend((data.len() as u64).to_le_bytes());
                central.extend((data.len() as u64).to_le_bytes());
                central.extend(u64::from(local_at).to_le_bytes());
            }
        }
        let cd_at = out.len();
        out.extend(&central);
        let n = entries.len();
        if zip64 {
            let record_at = out.len() as u64;
            out.extend(ZIP64_END_SIG.to_le_bytes());
            out.extend(44u64.to_le_bytes());
            out.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend((n as u64).to_le_bytes());
            out.extend((n as u64).to_le_bytes());
            out.extend((central.len() as u64).to_le_bytes());
            out.extend((cd_at as u64).to_le_bytes());
            out.extend(ZIP64_LOCATOR_SIG.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend(record_at.to_le_bytes());
            out.extend(1u32.to_le_bytes());
        }
        out.extend(END_SIG.to_le_bytes());
        out.extend([0, 0, 0, 0]);
        out.extend((n as u16).to_le_bytes());
        out.extend((n as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend((cd_at as u32).to_le_bytes());
        out.extend([0, 0]);
        out
    }

    #[test]
    fn reads_every_root_name_length_with_and_without_zip64_records() {
        for len in 1..=64 {
            let root = "r".repeat(len);
            let (pkl, tensor) = (format!("{root}/data.pkl"), format!("{root}/data/0"));
            for zip64 in [false, true] {
                let bytes = archive(&[(&pkl, b"pickle"), (&tensor, &[7u8; 100])], zip64);
                let zip = StoredZip::parse(&bytes).unwrap_or_else(|e| panic!("root length {len}: {e}"));
                assert_eq!(zip.names().collect::<Vec<_>>(), [pkl.as_str(), tensor.as_str()]);
                assert_eq!(zip.read(&pkl).unwrap(), b"pickle");
                assert_eq!(zip.read(&tensor).unwrap(), &[7u8; 100]);
                assert_eq!(zip.size(&tensor), Some(100));
            }
        }
    }

    #[test]
    fn sizes_and_offsets_in_zip64_extra_fields_are_read() {
        let entries: [(&str, &[u8]); 2] = [("big/data.pkl", b"pickle"), ("big/data/0", &[3u8; 300])];
        let bytes = archive_with(&entries, true, true);
        let zip = StoredZip::parse(&bytes).unwrap();
        assert_eq!(zip.read("big/data/0").unwrap(), &[3u8; 300]);
        assert_eq!(zip.read("big/data.pkl").unwrap(), b"pickle");
        // Without the extra field the saturated values cannot be resolved.
        let cd_at = bytes.windows(4).position(|w| w == CENTRAL_SIG.to_le_bytes()).unwrap();
        let mut no_extra = bytes.clone();
        no_extra[cd_at + 46 + "big/data.pkl".len()..][..2].copy_from_slice(&0x7777u16.to_le_bytes());
        let e = StoredZip::parse(&no_extra).unwrap_err().to_string();
        assert!(e.contains("defers its sizes to a zip64 extra field it does not have"), "{e}");
    }

    #[test]
    fn defects_are_errors_that_say_what() {
        let good = archive(&[("a/data.pkl", b"pickle"), ("a/data/0", &[1u8; 64])], true);
        let parse = |bytes: &[u8]| StoredZip::parse(bytes).map(|_| ()).unwrap_err().to_string();
        assert!(parse(&good[..good.len() - 1]).contains("no end-of-central-directory record"));
        assert!(parse(b"").contains("no end-of-central-directory record"));

        let mut flipped = good.clone();
        let data_at = good.windows(8).position(|w| w == [1u8; 8]).unwrap();
        flipped[data_at] ^= 0x40;
        let zip = StoredZip::parse(&flipped).unwrap();
        assert!(matches!(zip.read("a/data/0"), Err(ZipError::Crc { .. })));
        assert_eq!(zip.read("a/nothing"), Err(ZipError::Missing("a/nothing".into())));

        // A compressed entry: method 8 in the first central header.
        let cd_at = good.windows(4).position(|w| w == CENTRAL_SIG.to_le_bytes()).unwrap();
        let mut deflated = good.clone();
        deflated[cd_at + 10] = 8;
        assert!(parse(&deflated).contains("compressed (method 8)"));

        // An end record that disagrees with the zip64 record.
        let mut disagree = good.clone();
        let end_at = good.len() - END_LEN;
        disagree[end_at + 10] = 3;
        disagree[end_at + 8] = 3;
        assert!(parse(&disagree).contains("entry count is 3 but the zip64 record's is 2"), "{}", parse(&disagree));

        // A huge entry count is refused before anything is allocated for it.
        let mut huge = good.clone();
        let record_at = good.len() - END_LEN - ZIP64_LOCATOR_LEN - ZIP64_END_LEN;
        huge[record_at + 24..record_at + 40].copy_from_slice(&[0xff; 16]);
        huge[end_at + 8..end_at + 12].copy_from_slice(&[0xff; 4]);
        assert!(parse(&huge).contains("more than a central directory"), "{}", parse(&huge));
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_checked_read() {
        let tensor: Vec<u8> = (0..=255).collect();
        let good = archive(&[("root/data.pkl", b"pickle bytes"), ("root/data/0", &tensor)], true);
        for cut in 0..good.len() {
            assert!(StoredZip::parse(&good[..cut]).is_err(), "truncated at {cut}");
        }
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            if let Ok(zip) = StoredZip::parse(&bad) {
                // Whatever still parses must not hand back changed bytes as good ones.
                for name in ["root/data.pkl", "root/data/0"] {
                    if let Ok(data) = zip.read(name) {
                        let original = if name.ends_with("pkl") { &b"pickle bytes"[..] } else { &tensor[..] };
                        assert_eq!(data, original, "flip at {at} changed {name}");
                    }
                }
            }
        }
    }
}
