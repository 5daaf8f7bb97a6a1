//! Text of an uploaded report (plain text, markdown, HTML or PDF) for the mapper: what the
//! workbench's upload and `map --document --input` read. PDF text comes from `pdf-extract`; a
//! malformed or hostile PDF gives an error naming the file, never a crash.

use std::panic::AssertUnwindSafe;

/// Largest report accepted (bytes).
pub const MAX_REPORT_BYTES: usize = 16 * 1024 * 1024;

/// Report formats read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// Plain text or markdown.
    Text,
    /// An HTML page (the mapper drops its markup, scripts and styles).
    Html,
    /// A PDF (its text layer; scanned images have none).
    Pdf,
}

impl ReportKind {
    /// The kind a file name says (`.txt`, `.text`, `.md`, `.markdown`, `.html`, `.htm`, `.pdf`),
    /// or the PDF signature its bytes start with.
    pub fn of(name: &str, bytes: &[u8]) -> Option<ReportKind> {
        if bytes.starts_with(b"%PDF-") {
            return Some(ReportKind::Pdf);
        }
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" | "md" | "markdown" => Some(ReportKind::Text),
            "html" | "htm" => Some(ReportKind::Html),
            "pdf" => Some(ReportKind::Pdf),
            _ => None,
        }
    }
}

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// Not one of the formats read.
    #[error("{0}: not a report this reads; give a .txt, .md, .html or .pdf file")]
    Unsupported(String),
    /// Too large.
    #[error("{name}: {bytes} bytes is more than the {max} MB a report may have; split it", max = MAX_REPORT_BYTES / (1024 * 1024))]
    TooLarge {
        /// File name.
        name: String,
        /// Its size.
        bytes: usize,
    },
    /// Text that is not UTF-8.
    #[error("{0}: not UTF-8 text; save it as UTF-8 and try again")]
    NotUtf8(String),
    /// A PDF whose text could not be read.
    #[error(
        "{name}: the PDF's text could not be read ({why}); save it again as PDF or paste its text"
    )]
    Pdf {
        /// File name.
        name: String,
        /// What went wrong.
        why: String,
    },
    /// A PDF without a text layer.
    #[error("{0}: the PDF has no text layer (a scan?); run it through OCR or paste its text")]
    NoText(String),
}

/// The text of report `name` (shown in errors) from its bytes.
pub fn report_text(name: &str, bytes: &[u8]) -> Result<String, ExtractError> {
    if bytes.len() > MAX_REPORT_BYTES {
        return Err(ExtractError::TooLarge {
            name: name.to_string(),
            bytes: bytes.len(),
        });
    }
    let kind =
        ReportKind::of(name, bytes).ok_or_else(|| ExtractError::Unsupported(name.to_string()))?;
    match kind {
        ReportKind::Text | ReportKind::Html => std::str::from_utf8(bytes)
            .map(|s| s.trim_start_matches('\u{feff}').to_string())
            .map_err(|_| ExtractError::NotUtf8(name.to_string())),
        ReportKind::Pdf => pdf_text(name, bytes),
    }
}

fn pdf_text(name: &str, bytes: &[u8]) -> Result<String, ExtractError> {
    // pdf-extract asserts on some malformed input; a hostile upload must not take a worker down.
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        pdf_extract::extract_text_from_mem(bytes)
    }));
    let text = match r {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(ExtractError::Pdf {
                name: name.to_string(),
                why: e.to_string(),
            })
        }
        Err(_) => {
            return Err(ExtractError::Pdf {
                name: name.to_string(),
                why: "malformed PDF".into(),
            })
        }
    };
    if text.trim().is_empty() {
        return Err(ExtractError::NoText(name.to_string()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-page PDF (Helvetica, one line per entry of `lines`), laid out as the PDF 1.4
    /// reference describes: objects, a cross-reference table with their byte offsets, a trailer.
    fn pdf(lines: &[&str]) -> Vec<u8> {
        let mut stream = String::from("BT /F1 11 Tf 14 TL 50 750 Td\n");
        for l in lines {
            let esc = l
                .replace('\\', "\\\\")
                .replace('(', "\\(")
                .replace(')', "\\)");
            stream.push_str(&format!("({esc}) Tj T*\n"));
        }
        stream.push_str("ET");
        let objects = [
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> >>"
                .to_string(),
            format!(
                "<< /Length {} >>\nstream\n{stream}\nendstream",
                stream.len()
            ),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
                .to_string(),
        ];
        let mut out = b"%PDF-1.4\n".to_vec();
        let mut offsets = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend_from_slice(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
        }
        let xref = out.len();
        out.extend_from_slice(
            format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
        );
        for o in offsets {
            out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
                objects.len() + 1
            )
            .as_bytes(),
        );
        out
    }

    #[test]
    fn a_pdf_reports_text_is_read() {
        let bytes = pdf(&[
            "The actor ran a PowerShell download cradle (IEX).",
            "It then dumped LSASS memory.",
        ]);
        let text = report_text("report.pdf", &bytes).unwrap();
        assert!(
            text.contains("PowerShell download cradle (IEX)"),
            "{text:?}"
        );
        assert!(text.contains("dumped LSASS memory"), "{text:?}");
        // The signature decides, whatever the name says.
        assert!(report_text("report.bin", &bytes).is_ok());
    }

    #[test]
    fn bad_reports_get_errors_naming_the_file_and_the_fix() {
        let e = report_text("x.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog").unwrap_err();
        assert!(matches!(e, ExtractError::Pdf { .. }), "{e}");
        assert!(e.to_string().starts_with("x.pdf: "), "{e}");
        let mut truncated = pdf(&["Some text."]);
        truncated.truncate(truncated.len() / 2);
        assert!(report_text("half.pdf", &truncated).is_err());
        let empty = pdf(&[]);
        let e = report_text("scan.pdf", &empty).unwrap_err();
        assert!(matches!(e, ExtractError::NoText(_)), "{e}");
        let e = report_text("a.docx", b"PK\x03\x04").unwrap_err();
        assert!(e.to_string().contains(".txt, .md, .html or .pdf"), "{e}");
        let e = report_text("a.txt", b"caf\xe9").unwrap_err();
        assert!(matches!(e, ExtractError::NotUtf8(_)), "{e}");
        let big = vec![b'a'; MAX_REPORT_BYTES + 1];
        assert!(matches!(
            report_text("big.txt", &big),
            Err(ExtractError::TooLarge { .. })
        ));
        assert_eq!(
            report_text("notes.md", "\u{feff}# Notes".as_bytes()).unwrap(),
            "# Notes"
        );
    }
}
