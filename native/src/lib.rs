//! Ingest's fast path in native code (`auto_trace_native.FastPath`).
//!
//! Same contract as `consumer/fastpath.py`, which stays the reference and the fallback: a plain,
//! well-formed JSON `trade.closed` record becomes its TraceRecord Avro bytes, key, close time
//! and trade id; anything else returns `None` and the pydantic path decides and words the
//! rejection. So this code never rejects anything and never needs a reason: when in doubt it
//! declines. `tests/unit/test_fastpath.py` holds it to byte-identical output with the pydantic
//! path on generated, mutated and corrupted input, as it holds the Python fast path.
//!
//! Why native: the Python fast path costs ~15-25 µs a record, most of it the interpreter
//! stepping through a few dozen small checks; here the same checks cost ~1-2 µs, which is most
//! of what separates ingest from a plain consume-produce copy (make bench R1).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Largest record taken here: bounds what the parsers could disagree on (as in fastpath.py).
const MAX_FAST_BYTES: usize = 4096;
const MS_PER_DAY: i64 = 86_400_000;

/// Avro bytes of a close reason (union branch 1, then the enum index), `None` if unknown.
fn close_reason(value: Option<&str>) -> Option<&'static [u8]> {
    Some(match value {
        None => b"\x00",
        Some("TAKE_PROFIT") => b"\x02\x00",
        Some("STOP_LOSS") => b"\x02\x02",
        Some("MANUAL") => b"\x02\x04",
        Some("MARGIN_CALL") => b"\x02\x06",
        Some("EXPIRY") => b"\x02\x08",
        Some(_) => return None,
    })
}

/// An Avro `long`: zigzag, then 7 bits a byte, low first.
fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z > 0x7F {
        out.push((z as u8 & 0x7F) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    put_long(out, text.len() as i64);
    out.extend_from_slice(text.as_bytes());
}

/// Python's `str.isspace()` for one character: Unicode White_Space (Rust's `is_whitespace`)
/// plus U+001C..U+001F, which Python counts as space through their bidirectional class.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `text and not text.isspace()`, as the model's "not empty after strip()".
fn not_blank(text: &str) -> bool {
    text.chars().any(|c| !python_space(c))
}

/// Hex digits, for [`is_uuid`]: one load a byte instead of three range checks.
const HEX: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = (c as u8).is_ascii_hexdigit();
        c += 1;
    }
    table
};

/// `[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}`, whole.
fn is_uuid(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return false;
    }
    [&b[..8], &b[9..13], &b[14..18], &b[19..23], &b[24..]]
        .iter()
        .all(|part| part.iter().all(|c| HEX[usize::from(*c)]))
}

fn digits(text: &[u8]) -> Option<i128> {
    // Up to 18 digits fit a u64 without a check (the usual amount has under ten); past that,
    // i128 with overflow checks.
    if text.len() <= 18 {
        let mut n: u64 = 0;
        for c in text {
            if !c.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u64::from(c - b'0');
        }
        return Some(i128::from(n));
    }
    let mut n: i128 = 0;
    for c in text {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
    }
    Some(n)
}

/// The index of the first byte of `bytes` that ends a plain JSON string's text: a quote, a
/// backslash or a control character. The strings are most of a record, and a byte-at-a-time
/// loop over them was ~40% of the scan: on x86-64 sixteen bytes are compared at once (SSE2,
/// which every x86-64 has; a string's end is usually in the first sixteen), the rest eight at
/// a time.
fn string_stop(bytes: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8,
        };
        let mut at = 0;
        while at + 16 <= bytes.len() {
            // SAFETY: SSE2 is part of the x86-64 baseline; the sixteen bytes read lie inside
            // `bytes` (the loop condition), and an unaligned load takes any address.
            let mask = unsafe {
                let x = _mm_loadu_si128(bytes.as_ptr().add(at).cast());
                let quote = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8));
                // x <= 0x1f, unsigned: max(x, 0x1f) is 0x1f only then.
                let limit = _mm_set1_epi8(0x1f);
                let control = _mm_cmpeq_epi8(_mm_max_epu8(x, limit), limit);
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
            };
            if mask != 0 {
                return Some(at + mask.trailing_zeros() as usize);
            }
            at += 16;
        }
        words_stop(&bytes[at..]).map(|n| at + n)
    }
    #[cfg(not(target_arch = "x86_64"))]
    words_stop(bytes)
}

/// [`string_stop`] eight bytes at a time, in plain integer arithmetic.
fn words_stop(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Each mask's lowest set bit marks the first byte that matches (higher bits may be false
    // positives, from the borrow), so the lowest bit of their union is the first stop.
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let mut at = 0;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let w = u64::from_le_bytes(chunk.try_into().ok()?);
        let found = zero(w ^ (ONES * u64::from(b'"')))
            | zero(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|c| *c == b'"' || *c == b'\\' || *c < 0x20)
        .map(|n| at + n)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's civil-days method).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// A JSON string, borrowed from the input when it holds no escape (every field of a normal
/// trade), so that parsing a record allocates almost nothing.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// The fields the contract reads, as msgspec types them for the Python fast path: `str`
/// fields must be strings, the optional ones strings or null, the decimals and times any
/// scalar (kept as their raw JSON text). Unknown fields are skipped; a repeated field keeps its
/// last value, as Python's json module does for the pydantic path.
#[derive(Default)]
struct Trade<'a> {
    text: [Option<Text<'a>>; 10],
    optional: [Option<Option<Text<'a>>>; 4],
    /// Each value's JSON text as it stands in the record.
    raw: [Option<&'a str>; 8],
}

/// Where a field's value goes: its index in [`Trade`]'s `text`, `optional` or `raw`, in the
/// order `FastPath::encode` reads them.
enum Slot {
    Text(usize),
    Optional(usize),
    Raw(usize),
    Ignored,
}

/// One `match` (the compiler dispatches on length, then bytes) rather than three scans of name
/// tables for each of a record's ~20 keys (~4% of the native call).
fn slot(key: &str) -> Slot {
    match key {
        "event_id" => Slot::Text(0),
        "trade_id" => Slot::Text(1),
        "instrument" => Slot::Text(2),
        "side" => Slot::Text(3),
        "currency" => Slot::Text(4),
        "account_id" => Slot::Text(5),
        "user_id" => Slot::Text(6),
        "client_id" => Slot::Text(7),
        "user_email" => Slot::Text(8),
        "user_name" => Slot::Text(9),
        "signal_id" => Slot::Optional(0),
        "close_reason" => Slot::Optional(1),
        "client_ip" => Slot::Optional(2),
        "comment" => Slot::Optional(3),
        "volume" => Slot::Raw(0),
        "entry_price" => Slot::Raw(1),
        "exit_price" => Slot::Raw(2),
        "profit_loss" => Slot::Raw(3),
        "commission" => Slot::Raw(4),
        "swap" => Slot::Raw(5),
        "open_time" => Slot::Raw(6),
        "close_time" => Slot::Raw(7),
        _ => Slot::Ignored,
    }
}

impl<'de> Deserialize<'de> for Trade<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TradeVisitor;
        impl<'de> Visitor<'de> for TradeVisitor {
            type Value = Trade<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a trade object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut trade = Trade::default();
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match slot(key.as_ref()) {
                        Slot::Text(i) => trade.text[i] = Some(map.next_value()?),
                        Slot::Optional(i) => trade.optional[i] = Some(map.next_value()?),
                        Slot::Raw(i) => trade.raw[i] = Some(map.next_value::<&RawValue>()?.get()),
                        Slot::Ignored => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(trade)
            }
        }
        deserializer.deserialize_map(TradeVisitor)
    }
}

/// JSON's four whitespace bytes (RFC 8259), the ones serde_json and Python's json skip.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// A position in a record's text, for [`scan`].
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_space(&mut self) {
        let bytes = self.text.as_bytes();
        while bytes.get(self.at).is_some_and(|c| is_space(*c)) {
            self.at += 1;
        }
    }

    /// At an opening quote: the string's text, if it holds no escape and no control character
    /// (then the text between the quotes is the string).
    fn string(&mut self) -> Option<&'a str> {
        let start = self.at + 1;
        let rest = self.text.as_bytes().get(start..)?;
        let n = string_stop(rest)?;
        if rest[n] != b'"' {
            return None;
        }
        self.at = start + n + 1;
        Some(&self.text[start..start + n])
    }

    /// At a number: its text, if it follows JSON's grammar
    /// (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`).
    fn number(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut i = start + usize::from(bytes.get(start) == Some(&b'-'));
        let digits = |from: usize| {
            from + bytes[from..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count()
        };
        match bytes.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(i),
            _ => return None,
        }
        if bytes.get(i) == Some(&b'.') {
            let end = digits(i + 1);
            if end == i + 1 {
                return None;
            }
            i = end;
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(bytes.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let end = digits(i);
            if end == i {
                return None;
            }
            i = end;
        }
        self.at = i;
        Some(&self.text[start..i])
    }

    fn literal(&mut self, word: &str) -> bool {
        let found = self.text.as_bytes()[self.at..].starts_with(word.as_bytes());
        if found {
            self.at += word.len();
        }
        found
    }

    /// At a scalar value: its JSON text (a string with its quotes).
    fn value(&mut self) -> Option<&'a str> {
        let start = self.at;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'-' | b'0'..=b'9' => {
                self.number()?;
            }
            _ => {
                if !(self.literal("true") || self.literal("false") || self.literal("null")) {
                    return None;
                }
            }
        }
        Some(&self.text[start..self.at])
    }
}

/// The usual record, read in one pass: a flat object whose strings hold no escape. Gives the
/// [`Trade`] the serde parse would give, or None for anything else (an escape, a malformed
/// or unexpected value, a field of the wrong type), which the serde parse then decides. The
/// native call took 1.25 µs a record this way, 1.64 µs through serde_json's generic parse.
fn scan(text: &str) -> Option<Trade<'_>> {
    let mut c = Cursor { text, at: 0 };
    if c.peek()? != b'{' {
        return None;
    }
    c.at += 1;
    c.skip_space();
    let mut trade = Trade::default();
    if c.peek()? == b'}' {
        c.at += 1;
    } else {
        loop {
            if c.peek()? != b'"' {
                return None;
            }
            let key = c.string()?;
            c.skip_space();
            if c.peek()? != b':' {
                return None;
            }
            c.at += 1;
            c.skip_space();
            let quoted = c.peek()? == b'"';
            match slot(key) {
                Slot::Text(i) if quoted => trade.text[i] = Some(Text(Cow::Borrowed(c.string()?))),
                Slot::Optional(i) if quoted => {
                    trade.optional[i] = Some(Some(Text(Cow::Borrowed(c.string()?))));
                }
                Slot::Optional(i) if c.literal("null") => trade.optional[i] = Some(None),
                Slot::Text(_) | Slot::Optional(_) => return None,
                Slot::Raw(i) => trade.raw[i] = Some(c.value()?),
                Slot::Ignored => {
                    c.value()?;
                }
            }
            c.skip_space();
            match c.peek()? {
                b',' => {
                    c.at += 1;
                    c.skip_space();
                }
                b'}' => {
                    c.at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    c.skip_space();
    (c.at == text.len()).then_some(trade)
}

/// A scalar the Python fast path reads as `Any`: msgspec gives an integer (no fraction, no
/// exponent) as an int and any other number, through ``float_hook=str``, as its own text.
enum Scalar<'a> {
    Int(i128),
    Text(Cow<'a, str>),
}

fn scalar(text: &str) -> Option<Scalar<'_>> {
    match text.as_bytes().first()? {
        // The record's parse already checked it is a JSON string: without a backslash, its
        // text is what lies between the quotes.
        b'"' if !text.contains('\\') => Some(Scalar::Text(Cow::Borrowed(&text[1..text.len() - 1]))),
        b'"' => serde_json::from_str::<Text<'_>>(text)
            .ok()
            .map(|t| Scalar::Text(t.0)),
        b'-' | b'0'..=b'9' => {
            if text.bytes().any(|c| matches!(c, b'.' | b'e' | b'E')) {
                Some(Scalar::Text(Cow::Borrowed(text)))
            } else {
                // Past i128 Python would still have an int; declining is always safe.
                text.parse::<i128>().ok().map(Scalar::Int)
            }
        }
        _ => None, // true, false, null
    }
}

struct Rules {
    max_bytes: usize,
    skew_ms: i64,
    min_time_ms: i64,
    integer_digits: usize,
    scale: usize,
    max_whole: i128,
    unit: i128,
    currencies: HashSet<String>,
}

impl Rules {
    /// The unscaled value of a decimal exact at the scale, or None to decline.
    fn unscaled(&self, raw: &str) -> Option<i128> {
        match scalar(raw)? {
            Scalar::Text(text) => self.decimal_text(&text),
            Scalar::Int(n) => (-self.max_whole < n && n < self.max_whole).then(|| n * self.unit),
        }
    }

    /// `-?\d{1,20}(?:\.\d{1,8})?` whole, as fastpath.py's pattern.
    fn decimal_text(&self, text: &str) -> Option<i128> {
        let bytes = text.as_bytes();
        let (negative, body) = match bytes.first() {
            Some(b'-') => (true, &bytes[1..]),
            _ => (false, bytes),
        };
        let (whole, fraction) = match body.iter().position(|c| *c == b'.') {
            Some(dot) => (&body[..dot], &body[dot + 1..]),
            None => (body, &body[body.len()..]),
        };
        let dotted = whole.len() < body.len();
        if whole.is_empty() || whole.len() > self.integer_digits {
            return None;
        }
        if dotted && (fraction.is_empty() || fraction.len() > self.scale) {
            return None;
        }
        let mut n = digits(whole)?.checked_mul(self.unit)?;
        let mut frac = digits(fraction)?;
        for _ in fraction.len()..self.scale {
            frac *= 10;
        }
        n += frac;
        Some(if negative { -n } else { n })
    }

    /// Epoch ms of a time the model reads as the same millisecond, or None to decline.
    fn epoch_ms(&self, raw: &str) -> Option<i64> {
        match scalar(raw)? {
            Scalar::Int(ms) => i64::try_from(ms).ok().filter(|ms| *ms >= self.min_time_ms),
            Scalar::Text(text) => self.time_text(&text),
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+00:00)`, the only forms the Python fast path takes.
    fn time_text(&self, text: &str) -> Option<i64> {
        let b = text.as_bytes();
        if b.len() < 20 {
            return None;
        }
        let num = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = &b[range];
            part.iter()
                .all(u8::is_ascii_digit)
                .then(|| part.iter().fold(0_i64, |n, c| n * 10 + i64::from(c - b'0')))
        };
        if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        // date.fromisoformat: year 1..9999, a real day of a real month.
        if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
            return None;
        }
        let mut rest = &b[19..];
        let mut millis = 0_i64;
        if let Some(after_dot) = rest.strip_prefix(b".") {
            let n = after_dot.iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 || n > 9 {
                return None;
            }
            // Whole milliseconds, truncated, as the model keeps them.
            for i in 0..3 {
                millis = millis * 10
                    + after_dot
                        .get(i)
                        .filter(|_| i < n)
                        .map_or(0, |c| i64::from(c - b'0'));
            }
            rest = &after_dot[n..];
        }
        if rest != b"Z" && rest != b"+00:00" {
            return None;
        }
        let start =
            days_from_civil(year, month, day) * MS_PER_DAY + hour * 3_600_000 + minute * 60_000;
        if start < self.min_time_ms {
            return None;
        }
        Some(start + second * 1000 + millis)
    }
}

/// A decimal's Avro `bytes` field: two's complement, big-endian, in fastavro's size
/// (`(bit_length + 8) // 8` bytes of the magnitude, one more than minimal for -2**k).
fn put_decimal(out: &mut Vec<u8>, unscaled: i128) {
    let bits = 128 - unscaled.unsigned_abs().leading_zeros() as usize;
    let size = (bits + 8) >> 3;
    put_long(out, size as i64);
    out.extend_from_slice(&unscaled.to_be_bytes()[16 - size..]);
}

/// Callable on raw JSON bytes: `(value, key, close_ms, trade_id)` or None ("let pydantic
/// decide"), as `consumer.fastpath.JsonFastPath`. [`FastPath::traced`] gives the same record
/// with the delay topic's headers instead of the last two values.
#[pyclass(frozen, module = "auto_trace_native")]
struct FastPath {
    rules: Rules,
    /// The delay window added to the close time for the due header (`traced` only).
    #[pyo3(get)]
    window_ms: i64,
    /// The due header's name, from `consumer.headers`.
    due_header: Py<PyString>,
}

/// A decimal integer's ASCII digits, as Python's `b"%d" % n`: written from the end of the
/// buffer, so the text is `buf[start..]`.
fn ascii_int(n: i64) -> ([u8; 20], usize) {
    let mut buf = [0_u8; 20]; // i64::MIN: a sign and 19 digits
    let mut start = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        start -= 1;
        buf[start] = b'-';
    }
    (buf, start)
}

/// What `encode` gives besides the Avro value it writes into the caller's buffer: the key, the
/// close time and the trade id, the two texts borrowed from the input whenever they stand in it
/// unescaped (the usual case).
type Encoded<'a> = (Cow<'a, [u8]>, i64, Cow<'a, [u8]>);

/// `text` as a slice of `raw` when it lies inside `raw` (a string read without unescaping),
/// else a copy: saves two allocations and copies a record, without `unsafe`.
fn within<'a>(raw: &'a [u8], text: &str) -> Cow<'a, [u8]> {
    let start = (text.as_ptr() as usize).wrapping_sub(raw.as_ptr() as usize);
    match raw.get(start..start.wrapping_add(text.len())) {
        Some(slice) if slice.as_ptr() == text.as_ptr() => Cow::Borrowed(slice),
        _ => Cow::Owned(text.as_bytes().to_vec()),
    }
}

thread_local! {
    /// Where each record's Avro value is written before Python copies it: one buffer per
    /// thread, reused, instead of an allocation a record.
    static VALUE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}
/// `traced`'s answer: value, key and the delay topic's headers as ingest writes them.
type PyTraced<'py> = (Bound<'py, PyBytes>, Bound<'py, PyBytes>, Bound<'py, PyList>);
/// What Python receives: the same four values as bytes, bytes, int, bytes.
type PyEncoded<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    i64,
    Bound<'py, PyBytes>,
);

impl FastPath {
    fn encode<'a>(&self, raw: &'a [u8], now_ms: i64, value: &mut Vec<u8>) -> Option<Encoded<'a>> {
        let r = &self.rules;
        if raw.is_empty() || raw.len() > r.max_bytes {
            return None;
        }
        // Nothing nested (a bracket inside a string too goes the pydantic way).
        if raw[1..].contains(&b'{') || raw.contains(&b'[') {
            return None;
        }
        // Valid UTF-8 throughout, as the stdlib parser requires; a plain ASCII record (the
        // usual one) is checked a word at a time, several times faster than a UTF-8 check.
        let text = if raw.is_ascii() {
            // SAFETY: ASCII is valid UTF-8.
            unsafe { std::str::from_utf8_unchecked(raw) }
        } else {
            std::str::from_utf8(raw).ok()?
        };
        let trade: Trade<'_> = match scan(text) {
            Some(trade) => trade,
            None => serde_json::from_str(text).ok()?,
        };
        let mut texts: [&str; 10] = [""; 10];
        for (slot, field) in texts.iter_mut().zip(&trade.text) {
            *slot = field.as_ref()?.0.as_ref();
        }
        let [event_id, trade_id, instrument, side, currency, personal @ ..] = texts;
        // Personal fields: present, strings, not empty; their values are never read further.
        if personal.iter().any(|p| p.is_empty()) {
            return None;
        }
        // Absent or null is None (the outer Option is "present").
        let optional = |i: usize| {
            trade.optional[i]
                .as_ref()
                .and_then(|o| o.as_ref())
                .map(|t| t.0.as_ref())
        };
        let signal = optional(0).filter(|s| !s.is_empty()); // "" means no signal, as in the model
        let reason = close_reason(optional(1))?;

        let side: &[u8] = match side {
            "BUY" => b"\x00",
            "SELL" => b"\x02",
            _ => return None,
        };
        if !r.currencies.contains(currency) || !is_uuid(event_id) {
            return None;
        }
        if !not_blank(trade_id) || !not_blank(instrument) || signal.is_some_and(|s| !not_blank(s)) {
            return None;
        }

        let [volume, entry, exit, profit, commission, swap, open_time, close_time] = trade.raw;
        let close_ms = r.epoch_ms(close_time?)?;
        let open_ms = r.epoch_ms(open_time?)?;
        if close_ms < open_ms || close_ms > now_ms.checked_add(r.skew_ms)? {
            return None;
        }

        let mut amounts = [0_i128; 6];
        for (slot, raw) in amounts
            .iter_mut()
            .zip([volume, entry, exit, profit, commission, swap])
        {
            *slot = r.unscaled(raw?)?;
        }
        if amounts[0] <= 0 {
            return None;
        }

        value.clear();
        put_string(value, event_id);
        put_string(value, trade_id);
        match signal {
            None => value.push(0x00),
            Some(s) => {
                value.push(0x02);
                put_string(value, s);
            }
        }
        put_string(value, instrument);
        value.extend_from_slice(side);
        for unscaled in amounts {
            put_decimal(value, unscaled);
        }
        put_string(value, currency);
        put_long(value, open_ms);
        put_long(value, close_ms);
        value.extend_from_slice(reason);

        let key = within(raw, signal.unwrap_or(trade_id));
        Some((key, close_ms, within(raw, trade_id)))
    }
}

#[pymethods]
impl FastPath {
    #[new]
    #[pyo3(signature = (
        *, max_bytes, skew_ms, min_time_ms, integer_digits, scale, currencies, due_header,
        window_ms=0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        max_bytes: usize,
        skew_ms: i64,
        min_time_ms: i64,
        integer_digits: usize,
        scale: usize,
        currencies: HashSet<String>,
        due_header: &str,
        window_ms: i64,
    ) -> PyResult<Self> {
        // Beyond these the unscaled value could leave i128: refuse to build, never overflow.
        if integer_digits + scale > 36 || integer_digits == 0 || scale > 18 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "integer_digits + scale must be 1..36 (and scale at most 18)",
            ));
        }
        Ok(Self {
            rules: Rules {
                max_bytes: max_bytes.min(MAX_FAST_BYTES),
                skew_ms,
                min_time_ms,
                integer_digits,
                scale,
                max_whole: 10_i128.pow(integer_digits as u32),
                unit: 10_i128.pow(scale as u32),
                currencies,
            },
            window_ms,
            due_header: PyString::intern(py, due_header).unbind(),
        })
    }

    fn __call__<'py>(&self, py: Python<'py>, raw: &[u8], now_ms: i64) -> Option<PyEncoded<'py>> {
        VALUE.with_borrow_mut(|value| {
            let (key, close_ms, trade_id) = self.encode(raw, now_ms, value)?;
            Some((
                PyBytes::new(py, value),
                PyBytes::new(py, &key),
                close_ms,
                PyBytes::new(py, &trade_id),
            ))
        })
    }

    /// `(value, key, headers)` or None: what ingest produces to the delay topic, in one call.
    /// The headers are `consumer.ingest.trace_headers(close_ms, window_ms)`, built here: in
    /// Python they cost ~0.4 µs a record more, measured when there were three (1.84 against
    /// 2.27 µs).
    fn traced<'py>(
        &self,
        py: Python<'py>,
        raw: &[u8],
        now_ms: i64,
    ) -> PyResult<Option<PyTraced<'py>>> {
        VALUE.with_borrow_mut(|value| {
            let Some((key, close_ms, _)) = self.encode(raw, now_ms, value) else {
                return Ok(None);
            };
            let (due, due_start) = ascii_int(close_ms.saturating_add(self.window_ms));
            let headers = PyList::new(
                py,
                [(
                    self.due_header.bind(py),
                    PyBytes::new(py, &due[due_start..]),
                )],
            )?;
            Ok(Some((
                PyBytes::new(py, value),
                PyBytes::new(py, &key),
                headers,
            )))
        })
    }
}

#[pymodule]
fn auto_trace_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<FastPath>()?;
    Ok(())
}
