//! The daily activation and loss file a bank and its adapter exchange, in the bank's layout
//! (`ReconciliationLayout` of its bank file): fixed-width or CSV. Both sides write the same records, so
//! one reader and one writer serve the adapter's file and the bank core's.
//!
//! Fixed-width, one record per line, ASCII:
//!
//! ```text
//! H bank(8) date YYYYMMDD(8) records(8)                                              header, 25 chars
//! D kind(4) card_number(16) time YYYYMMDDHHMMSS(14) teller(32) branch(32) loss(1)   detail, 100 chars
//! T records(8)                                                                       trailer, 9 chars
//! ```
//!
//! kind is `ACT ` (financial activation), `RBCK` (activation rolled back), `LOSS` (financial function
//! frozen by a loss: loss `T` temporary or `W` written), `UNLK` (unfrozen). Times are the business day's
//! local time ([`BUSINESS_OFFSET`]). Teller and branch longer than 32 characters are cut in this layout.
//!
//! CSV (RFC 4180, a header row): `bank_code,business_date,record_type,card_number,occurred_at,teller_id,branch_id,loss_kind`
//! with the time in RFC 3339 and the record type and loss kind as in the fixed-width layout.

use socialcard_domain::bank::ReconciliationLayout;
use socialcard_domain::{CardNumber, Rejection};
use time::format_description::well_known::Rfc3339;
use time::macros::{format_description, offset};
use time::{Date, OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// The business day runs in Shanghai time (UTC+8).
pub const BUSINESS_OFFSET: UtcOffset = offset!(+8);

const TELLER_WIDTH: usize = 32;
const CSV_HEADER: &str = "bank_code,business_date,record_type,card_number,occurred_at,teller_id,branch_id,loss_kind";

/// What happened to a card's financial function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Activation,
    ActivationRolledBack,
    /// Frozen by a loss; `written` false for a temporary (phone) loss.
    Loss {
        written: bool,
    },
    Unlock,
}

impl RecordKind {
    fn code(self) -> &'static str {
        match self {
            Self::Activation => "ACT",
            Self::ActivationRolledBack => "RBCK",
            Self::Loss { .. } => "LOSS",
            Self::Unlock => "UNLK",
        }
    }

    fn loss_code(self) -> &'static str {
        match self {
            Self::Loss { written: true } => "W",
            Self::Loss { written: false } => "T",
            _ => "",
        }
    }

    fn parse(code: &str, loss: &str) -> Result<Self, &'static str> {
        match (code.trim(), loss.trim()) {
            ("ACT", "") => Ok(Self::Activation),
            ("RBCK", "") => Ok(Self::ActivationRolledBack),
            ("LOSS", "W") => Ok(Self::Loss { written: true }),
            ("LOSS", "T") => Ok(Self::Loss { written: false }),
            ("UNLK", "") => Ok(Self::Unlock),
            ("LOSS", _) => Err("a LOSS record needs loss kind T or W"),
            ("ACT" | "RBCK" | "UNLK", _) => Err("only a LOSS record has a loss kind"),
            _ => Err("unknown record type"),
        }
    }
}

/// One line of the file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DailyRecord {
    pub kind: RecordKind,
    pub card_number: String,
    /// Whole seconds.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub teller_id: String,
    pub branch_id: String,
}

/// A bank's records of one business day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DailyFile {
    pub bank_code: String,
    pub date: Date,
    pub records: Vec<DailyRecord>,
}

fn bad(line: usize, what: impl std::fmt::Display) -> Rejection {
    Rejection::invalid("bank_file", "RECONCILIATION_FILE_FORMAT", format!("line {line}: {what}"))
}

/// The first and last instant of `date` in business time, as unix micros `[start, end)`.
pub fn day_window(date: Date) -> (OffsetDateTime, OffsetDateTime) {
    let start = date.midnight().assume_offset(BUSINESS_OFFSET);
    (start, start + time::Duration::days(1))
}

fn printable(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

impl DailyFile {
    pub fn new(bank_code: impl Into<String>, date: Date) -> Self {
        Self { bank_code: bank_code.into(), date, records: Vec::new() }
    }

    /// The file's text in `layout`.
    pub fn render(&self, layout: ReconciliationLayout) -> String {
        match layout {
            ReconciliationLayout::FixedWidth => self.render_fixed(),
            ReconciliationLayout::Csv => self.render_csv(),
        }
    }

    fn render_fixed(&self) -> String {
        let date = self.date.format(format_description!("[year][month][day]")).unwrap_or_default();
        let mut out = format!("H{:<8}{date}{:08}\n", fit(&self.bank_code, 8), self.records.len());
        for r in &self.records {
            let at = r
                .occurred_at
                .to_offset(BUSINESS_OFFSET)
                .format(format_description!("[year][month][day][hour][minute][second]"))
                .unwrap_or_default();
            out.push_str(&format!(
                "D{:<4}{:<16}{at}{:<32}{:<32}{:<1}\n",
                r.kind.code(),
                fit(&r.card_number, 16),
                fit(&r.teller_id, TELLER_WIDTH),
                fit(&r.branch_id, TELLER_WIDTH),
                r.kind.loss_code()
            ));
        }
        out.push_str(&format!("T{:08}\n", self.records.len()));
        out
    }

    fn render_csv(&self) -> String {
        let mut out = format!("{CSV_HEADER}\n");
        for r in &self.records {
            let at = r.occurred_at.to_offset(BUSINESS_OFFSET).format(&Rfc3339).unwrap_or_default();
            let fields = [
                self.bank_code.as_str(),
                &self.date.to_string(),
                r.kind.code(),
                &r.card_number,
                &at,
                &r.teller_id,
                &r.branch_id,
                r.kind.loss_code(),
            ]
            .map(csv_field);
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        out
    }

    /// Reads a file of `layout`, refusing any malformed line (nothing of a bad file is used). The
    /// file must be `bank_code`'s for `date`, and every record within that day.
    pub fn parse(text: &str, layout: ReconciliationLayout, bank_code: &str, date: Date) -> Result<Self, Rejection> {
        let file = match layout {
            ReconciliationLayout::FixedWidth => Self::parse_fixed(text)?,
            ReconciliationLayout::Csv => Self::parse_csv(text, bank_code, date)?,
        };
        if file.bank_code != bank_code {
            return Err(Rejection::invalid(
                "bank_file",
                "RECONCILIATION_FILE_BANK_MISMATCH",
                format!("the file is bank {}'s, not {bank_code}'s", file.bank_code),
            ));
        }
        let (start, end) = day_window(date);
        let outside = file.records.iter().position(|r| r.occurred_at < start || r.occurred_at >= end);
        if file.date != date || outside.is_some() {
            return Err(Rejection::invalid(
                "bank_file",
                "RECONCILIATION_FILE_DATE_MISMATCH",
                format!("the file must hold the records of {date} only"),
            ));
        }
        Ok(file)
    }

    fn parse_fixed(text: &str) -> Result<Self, Rejection> {
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.first().ok_or_else(|| bad(1, "empty file: a header line is required"))?;
        if !header.is_ascii() || header.len() != 25 || !header.starts_with('H') {
            return Err(bad(1, "the header is `H` + bank (8) + date (8) + record count (8)"));
        }
        let bank_code = header[1..9].trim().to_string();
        let date = Date::parse(&header[9..17], format_description!("[year][month][day]"))
            .map_err(|_| bad(1, "the header's date is not YYYYMMDD"))?;
        let declared: usize =
            header[17..25].parse().map_err(|_| bad(1, "the header's record count is not a number"))?;
        let mut file = Self::new(bank_code, date);
        let mut trailer = None;
        for (i, line) in lines.iter().enumerate().skip(1) {
            let n = i + 1;
            if trailer.is_some() {
                return Err(bad(n, "nothing may follow the trailer"));
            }
            if !line.is_ascii() {
                return Err(bad(n, "the fixed-width layout is ASCII"));
            }
            match line.as_bytes().first() {
                Some(b'D') if line.len() == 100 => {
                    let kind = RecordKind::parse(&line[1..5], &line[99..100]).map_err(|e| bad(n, e))?;
                    let at = PrimitiveDateTime::parse(
                        &line[21..35],
                        format_description!("[year][month][day][hour][minute][second]"),
                    )
                    .map_err(|_| bad(n, "the time is not YYYYMMDDHHMMSS"))?
                    .assume_offset(BUSINESS_OFFSET);
                    file.records.push(record(n, kind, &line[5..21], at, &line[35..67], &line[67..99])?);
                }
                Some(b'D') => return Err(bad(n, "a detail line is 100 characters")),
                Some(b'T') if line.len() == 9 => {
                    trailer =
                        Some(line[1..9].parse::<usize>().map_err(|_| bad(n, "the trailer's count is not a number"))?);
                }
                _ => return Err(bad(n, "expected a detail (D) or trailer (T) line")),
            }
        }
        let counted = file.records.len();
        match trailer {
            Some(t) if t == declared && t == counted => Ok(file),
            Some(_) => Err(Rejection::invalid(
                "bank_file",
                "RECONCILIATION_FILE_COUNT_MISMATCH",
                format!("header and trailer declare records the file does not hold ({counted} found)"),
            )),
            None => Err(Rejection::invalid(
                "bank_file",
                "RECONCILIATION_FILE_COUNT_MISMATCH",
                "the file has no trailer: it may be cut short",
            )),
        }
    }

    fn parse_csv(text: &str, bank_code: &str, date: Date) -> Result<Self, Rejection> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h.trim_end() == CSV_HEADER => {}
            _ => return Err(bad(1, format!("the header row must be `{CSV_HEADER}`"))),
        }
        // A CSV file names its bank and day on every row; one without rows is the bank's empty day.
        let mut file = Self::new(bank_code, date);
        for (i, line) in lines {
            let n = i + 1;
            if line.is_empty() {
                continue;
            }
            let fields = csv_split(line).map_err(|e| bad(n, e))?;
            let [bank, day, kind, card, at, teller, branch, loss] =
                <[String; 8]>::try_from(fields).map_err(|f| bad(n, format!("{} fields, 8 expected", f.len())))?;
            if bank != file.bank_code {
                file.bank_code = bank;
                return Ok(file);
            }
            let day = Date::parse(&day, format_description!("[year]-[month]-[day]"))
                .map_err(|_| bad(n, "business_date is not YYYY-MM-DD"))?;
            if day != date {
                file.date = day;
                return Ok(file);
            }
            let kind = RecordKind::parse(&kind, &loss).map_err(|e| bad(n, e))?;
            let at = OffsetDateTime::parse(&at, &Rfc3339).map_err(|_| bad(n, "occurred_at is not RFC 3339"))?;
            file.records.push(record(n, kind, &card, at, &teller, &branch)?);
        }
        Ok(file)
    }
}

fn record(
    line: usize,
    kind: RecordKind,
    card: &str,
    at: OffsetDateTime,
    teller: &str,
    branch: &str,
) -> Result<DailyRecord, Rejection> {
    let card_number = CardNumber::parse(card.trim()).map_err(|e| bad(line, e.message))?;
    let (teller, branch) = (teller.trim(), branch.trim());
    if !printable(teller) || !printable(branch) || teller.chars().count() > 64 || branch.chars().count() > 64 {
        return Err(bad(line, "teller and branch are at most 64 printable characters"));
    }
    Ok(DailyRecord {
        kind,
        card_number: card_number.as_str().to_string(),
        occurred_at: at.replace_nanosecond(0).unwrap_or(at),
        teller_id: teller.to_string(),
        branch_id: branch.to_string(),
    })
}

/// At most `width` characters (and never a control character) for a fixed-width field.
fn fit(value: &str, width: usize) -> String {
    value.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(width).collect()
}

fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// Splits one CSV row (RFC 4180 quoting; a field never spans lines here).
fn csv_split(line: &str) -> Result<Vec<String>, &'static str> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field is not closed"),
                }
            }
            match chars.next() {
                Some(',') => fields.push(field),
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(_) => return Err("a quoted field must be followed by a comma"),
            }
        } else {
            loop {
                match chars.next() {
                    Some(',') => break,
                    Some('"') => return Err("a quote inside an unquoted field"),
                    Some(c) => field.push(c),
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                }
            }
            fields.push(field);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    fn sample() -> DailyFile {
        let mut f = DailyFile::new("icbc", date!(2025 - 03 - 04));
        f.records.push(DailyRecord {
            kind: RecordKind::Activation,
            card_number: "A00000018".into(),
            occurred_at: datetime!(2025-03-04 09:30:00 +08:00),
            teller_id: "teller, \"9\"".into(),
            branch_id: "branch-310105".into(),
        });
        f.records.push(DailyRecord {
            kind: RecordKind::Loss { written: false },
            card_number: "A00000018".into(),
            occurred_at: datetime!(2025-03-04 23:59:59 +08:00),
            teller_id: String::new(),
            branch_id: String::new(),
        });
        f
    }

    #[test]
    fn both_layouts_round_trip() {
        let f = sample();
        for layout in [ReconciliationLayout::FixedWidth, ReconciliationLayout::Csv] {
            let text = f.render(layout);
            assert_eq!(DailyFile::parse(&text, layout, "icbc", f.date).unwrap(), f, "{layout:?}\n{text}");
        }
        let fixed = f.render(ReconciliationLayout::FixedWidth);
        assert!(fixed.lines().all(|l| [25, 100, 9].contains(&l.len())), "{fixed}");
    }

    #[test]
    fn bad_files_are_refused_whole_with_a_reason() {
        let f = sample();
        let fixed = f.render(ReconciliationLayout::FixedWidth);
        let reason = |text: &str, layout| DailyFile::parse(text, layout, "icbc", f.date).unwrap_err().reason;
        let cut: String = fixed.lines().take(2).map(|l| format!("{l}\n")).collect();
        assert_eq!(reason(&cut, ReconciliationLayout::FixedWidth), "RECONCILIATION_FILE_COUNT_MISMATCH");
        assert_eq!(
            reason(&fixed.replace("ACT ", "XYZ "), ReconciliationLayout::FixedWidth),
            "RECONCILIATION_FILE_FORMAT"
        );
        assert_eq!(
            reason(&fixed.replace("A00000018", "A00000019"), ReconciliationLayout::FixedWidth),
            "RECONCILIATION_FILE_FORMAT"
        );
        assert_eq!(reason("", ReconciliationLayout::FixedWidth), "RECONCILIATION_FILE_FORMAT");
        assert_eq!(
            DailyFile::parse(&fixed, ReconciliationLayout::FixedWidth, "ccb", f.date).unwrap_err().reason,
            "RECONCILIATION_FILE_BANK_MISMATCH"
        );
        assert_eq!(
            DailyFile::parse(&fixed, ReconciliationLayout::FixedWidth, "icbc", date!(2025 - 03 - 05))
                .unwrap_err()
                .reason,
            "RECONCILIATION_FILE_DATE_MISMATCH"
        );
        let csv = f.render(ReconciliationLayout::Csv);
        assert_eq!(reason(&csv.replace(",T\n", ",X\n"), ReconciliationLayout::Csv), "RECONCILIATION_FILE_FORMAT");
        assert_eq!(
            reason(&csv.replace("T23:59:59+08:00", "T23:59:59+07:00"), ReconciliationLayout::Csv),
            "RECONCILIATION_FILE_DATE_MISMATCH"
        );
        assert_eq!(
            reason(&csv.replace("\nicbc,", "\nccb,"), ReconciliationLayout::Csv),
            "RECONCILIATION_FILE_BANK_MISMATCH"
        );
        assert_eq!(reason("a,b\n", ReconciliationLayout::Csv), "RECONCILIATION_FILE_FORMAT");
    }
}
