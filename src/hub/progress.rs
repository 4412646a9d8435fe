//! One progress line per downloaded file on stderr: bytes, percent, rate, ETA. Drawn only when
//! enabled and stderr is a terminal, at most ten times a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Bar {
    name: String,
    total: u64,
    done: u64,
    /// Bytes already on disk when this transfer started (a resume), left out of the rate.
    resumed: u64,
    start: Instant,
    last: Option<Instant>,
    on: bool,
}

impl Bar {
    pub fn new(name: &str, total: u64, resumed: u64, enabled: bool) -> Self {
        let on = enabled && std::io::stderr().is_terminal();
        Bar { name: name.to_string(), total, done: resumed, resumed, start: Instant::now(), last: None, on }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.on && self.last.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            self.draw(false);
        }
    }

    /// The last state, and a newline so the next output starts on its own line.
    pub fn finish(&mut self) {
        if self.on {
            self.draw(true);
        }
    }

    fn draw(&mut self, last: bool) {
        self.last = Some(Instant::now());
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.done - self.resumed) as f64 / secs;
        let pct = if self.total == 0 { 100.0 } else { 100.0 * self.done as f64 / self.total as f64 };
        let eta =
            if rate > 0.0 { format_secs(self.total.saturating_sub(self.done) as f64 / rate) } else { "--".to_string() };
        let line = format!(
            "\r{}  {} / {}  {pct:5.1}%  {}/s  ETA {eta}\x1b[K{}",
            self.name,
            format_bytes(self.done),
            format_bytes(self.total),
            format_bytes(rate as u64),
            if last { "\n" } else { "" }
        );
        // A stderr that cannot be written is no reason to fail a download.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn format_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_units() {
        assert_eq!(super::format_bytes(999), "999 B");
        assert_eq!(super::format_bytes(5_400_000_000), "5.4 GB");
        assert_eq!(super::format_secs(3725.0), "1h02m");
        assert_eq!(super::format_secs(65.0), "1:05");
    }
}
