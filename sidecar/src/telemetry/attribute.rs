//! A span attribute's value, kept in the form the request path had it. Istio's tags are strings,
//! but a status, a size, an address or the response flags are turned into text only when the span
//! is exported, straight into the export buffer, and a fixed text (`GET`, `HTTP/2`, `-`) is never
//! copied: a sampled request builds its tags without formatting anything, and most without
//! allocating.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::record::Flags;

/// A span's attributes: OTel or Istio names, and their values.
pub type Attributes = Vec<(&'static str, Value)>;

/// One attribute's value; exported as a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A fixed text.
    Static(&'static str),
    /// A text built or copied for this span.
    Text(String),
    /// A number, written in decimal.
    Number(u64),
    /// A signed number, written in decimal.
    Signed(i64),
    /// An address, written as `Display` writes it.
    Ip(IpAddr),
    /// Envoy's response flags, written as Envoy prints them.
    Flags(Flags),
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Value::Static(s)
    }
}

/// Room for a value formatted at export: the longest is an IPv6 address (45 bytes) or every
/// response flag at once (40 bytes).
#[derive(Debug)]
pub struct Scratch {
    buf: [u8; 64],
    len: usize,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl Scratch {
    fn as_str(&self) -> &str {
        // Only whole `&str`s and ASCII digits are ever written (`write_str`, `digits`).
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }

    /// Appends `b`; false (nothing written) when it does not fit.
    fn push(&mut self, b: &[u8]) -> bool {
        let end = self.len + b.len();
        match self.buf.get_mut(self.len..end) {
            Some(slot) => {
                slot.copy_from_slice(b);
                self.len = end;
                true
            }
            None => false,
        }
    }

    fn digits(&mut self, v: u64) {
        self.push(decimal(v, &mut [0; 20]));
    }
}

/// `v` in decimal, written at the end of `tmp`, without the formatting machinery (which costs
/// several times more).
fn decimal(mut v: u64, tmp: &mut [u8; 20]) -> &[u8] {
    let mut i = tmp.len();
    loop {
        i -= 1;
        // `v % 10` is below 10.
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &tmp[i..]
}

/// Appends `v` in decimal to `out`.
pub fn push_decimal(out: &mut String, v: u64) {
    for &d in decimal(v, &mut [0; 20]) {
        out.push(char::from(d));
    }
}

impl std::fmt::Write for Scratch {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.push(s.as_bytes()) {
            Ok(())
        } else {
            Err(std::fmt::Error)
        }
    }
}

impl Value {
    /// The value as the text exported; what needs formatting is formatted into `scratch`.
    pub fn text<'a>(&'a self, scratch: &'a mut Scratch) -> &'a str {
        scratch.len = 0;
        match self {
            Value::Static(s) => s,
            Value::Text(s) => s,
            Value::Number(n) => {
                scratch.digits(*n);
                scratch.as_str()
            }
            Value::Signed(n) => {
                if *n < 0 {
                    scratch.push(b"-");
                }
                scratch.digits(n.unsigned_abs());
                scratch.as_str()
            }
            Value::Ip(IpAddr::V4(a)) => {
                for (i, octet) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        scratch.push(b".");
                    }
                    scratch.digits(u64::from(octet));
                }
                scratch.as_str()
            }
            Value::Ip(ip) => {
                // An IPv6 address is 45 bytes at most, so it fits.
                let _ = write!(scratch, "{ip}"); // ok: fits, see above
                scratch.as_str()
            }
            Value::Flags(flags) => {
                flags.write(scratch);
                scratch.as_str()
            }
        }
    }

    /// The value as an owned string (OTLP/JSON, tests).
    pub fn to_text(&self) -> String {
        self.text(&mut Scratch::default()).to_owned()
    }
}

/// `method` as a fixed text when it is one of the standard methods (every request but a rare
/// extension method).
pub fn method(method: &http::Method) -> Value {
    use http::Method;
    let fixed = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return Value::Text(method.as_str().to_owned()),
    };
    Value::Static(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_display_writes_them() {
        let mut all = Flags::default();
        for f in [
            Flags::UH,
            Flags::UF,
            Flags::UO,
            Flags::NR,
            Flags::URX,
            Flags::UT,
            Flags::UC,
            Flags::DC,
            Flags::FI,
            Flags::DI,
            Flags::UR,
            Flags::NC,
            Flags::DPE,
        ] {
            all.set(f);
        }
        let cases: Vec<(Value, String)> = vec![
            (Value::Static("GET"), "GET".into()),
            (Value::Text("x".repeat(300)), "x".repeat(300)),
            (Value::Number(0), "0".into()),
            (Value::Number(u64::MAX), u64::MAX.to_string()),
            (Value::Signed(-1234), "-1234".into()),
            (Value::Signed(i64::MIN), i64::MIN.to_string()),
            (Value::Ip("10.0.0.7".parse().unwrap()), "10.0.0.7".into()),
            (Value::Ip("0.0.0.0".parse().unwrap()), "0.0.0.0".into()),
            (
                Value::Ip("255.255.255.255".parse().unwrap()),
                "255.255.255.255".into(),
            ),
            (
                Value::Ip(
                    "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                        .parse()
                        .unwrap(),
                ),
                "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                    .parse::<IpAddr>()
                    .unwrap()
                    .to_string(),
            ),
            (Value::Ip("fd00::1".parse().unwrap()), "fd00::1".into()),
            (Value::Flags(Flags::default()), "-".into()),
            (Value::Flags(all), all.to_string()),
        ];
        let mut scratch = Scratch::default();
        for (value, want) in cases {
            assert_eq!(value.text(&mut scratch), want, "{value:?}");
            assert_eq!(value.to_text(), want);
        }
        for _ in 0..1000 {
            let n = fastrand::u64(..);
            assert_eq!(Value::Number(n).text(&mut scratch), n.to_string());
            let s = fastrand::i64(..);
            assert_eq!(Value::Signed(s).text(&mut scratch), s.to_string());
            let ip = IpAddr::from(fastrand::u32(..).to_be_bytes());
            assert_eq!(Value::Ip(ip).text(&mut scratch), ip.to_string());
        }
    }

    #[test]
    fn standard_methods_are_not_copied() {
        assert_eq!(method(&http::Method::GET), Value::Static("GET"));
        assert_eq!(method(&http::Method::PATCH), Value::Static("PATCH"));
        let odd = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(method(&odd), Value::Text("PURGE".into()));
    }
}
