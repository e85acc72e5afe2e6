//! Chat templates: a model's Jinja `chat_template` rendered in Rust (minijinja) to the string
//! transformers' `apply_chat_template(messages, tokenize=False)` gives, and the byte spans of the
//! assistant turns in it (what an SFT loss trains on).
//!
//! transformers renders with Jinja2's `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
//! extension, the globals `raise_exception` and `strftime_now`, a `tojson` filter that writes as
//! Python's `json.dumps(ensure_ascii=False)` does, and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...) as variables; all are provided here, and Python's string
//! methods (`.strip()`, `.startswith()`, ...) through minijinja-contrib's pycompat.
//!
//! Assistant turns are found by rendering prefixes: the turn `i` spans from the end of
//! `render(messages[..i], add_generation_prompt = true)` to the end of `render(messages[..=i])`,
//! so it holds the reply and the template's end-of-turn marker (the model learns to stop). A
//! template under which a shorter conversation does not render to a prefix of the longer one is
//! refused: the spans would be guesses.

use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One message: `role` and `content` (a string; content given as a list of parts is passed to
/// the template as is).
pub type Message = serde_json::Value;

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Template variables: the special tokens of tokenizer_config.json, and any given with
    /// `with_variables` (as extra keyword arguments of `apply_chat_template`).
    special: serde_json::Map<String, serde_json::Value>,
    /// Where the template came from, for messages.
    pub origin: String,
    /// The template calls `strftime_now` (today's date).
    calls_strftime: bool,
}

/// The variable names of special tokens in tokenizer_config.json that templates read.
const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl ChatTemplate {
    /// The template of a tokenizer directory (a Hugging Face checkpoint): `chat_template.jinja`
    /// when present (as transformers saves it since 4.43), else `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of named templates of which `default`).
    pub fn from_tokenizer_dir(dir: &Path) -> Result<ChatTemplate> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            return ChatTemplate::from_file(&jinja, Some(&config_path));
        }
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from)
                .ok_or_else(|| Error::Data {
                    path: config_path.display().to_string(),
                    msg: "chat_template is a list without a \"default\" template".into(),
                })?,
            _ => {
                return Err(Error::Data {
                    path: dir.display().to_string(),
                    msg: "has no chat template (no chat_template.jinja, no chat_template in \
                          tokenizer_config.json); name one with template = \"FILE.jinja\""
                        .into(),
                })
            }
        };
        ChatTemplate::new(
            source,
            special_tokens(&config),
            config_path.display().to_string(),
        )
    }

    /// A template file, with the special tokens of a tokenizer_config.json if given.
    pub fn from_file(path: &Path, tokenizer_config: Option<&Path>) -> Result<ChatTemplate> {
        let source = std::fs::read_to_string(path).map_err(|e| Error::Data {
            path: path.display().to_string(),
            msg: format!("cannot read: {e}"),
        })?;
        let special = match tokenizer_config {
            Some(p) if p.is_file() => special_tokens(&read_json_object(p)?),
            _ => serde_json::Map::new(),
        };
        ChatTemplate::new(source, special, path.display().to_string())
    }

    fn new(
        source: String,
        special: serde_json::Map<String, serde_json::Value>,
        origin: String,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        let calls_strftime = source.contains("strftime_now");
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| Error::Data {
                path: origin.clone(),
                msg: format!("the chat template does not parse: {}", one_line_error(&e)),
            })?;
        Ok(ChatTemplate {
            env,
            special,
            origin,
            calls_strftime,
        })
    }

    /// Whether the rendered text may hold today's date: the template calls `strftime_now` and
    /// no `date_string` variable is given (Llama 3.x's templates prefer it when defined).
    pub fn reads_the_date(&self) -> bool {
        self.calls_strftime && !self.special.contains_key("date_string")
    }

    /// Adds template variables (transformers passes extra keyword arguments of
    /// `apply_chat_template` the same way, e.g. Llama 3's `date_string`).
    pub fn with_variables(mut self, vars: serde_json::Map<String, serde_json::Value>) -> Self {
        self.special.extend(vars);
        self
    }

    /// The conversation as text, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        #[derive(Serialize)]
        struct Context<'a> {
            messages: &'a [Message],
            add_generation_prompt: bool,
            #[serde(flatten)]
            special: &'a serde_json::Map<String, serde_json::Value>,
        }
        let template = self.env.get_template("chat").map_err(|e| self.err(&e))?;
        template
            .render(Context {
                messages,
                add_generation_prompt,
                special: &self.special,
            })
            .map_err(|e| self.err(&e))
    }

    fn err(&self, e: &minijinja::Error) -> Error {
        Error::Data {
            path: self.origin.clone(),
            msg: format!("the chat template failed: {}", one_line_error(e)),
        }
    }

    /// The rendered conversation and the byte ranges of its assistant turns (reply and
    /// end-of-turn marker), found by rendering prefixes (see the module comment).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !full.starts_with(&through) || !through.starts_with(&before) {
                return Err(Error::Data {
                    path: self.origin.clone(),
                    msg: format!(
                        "the chat template does not render the first {} messages as a prefix \
                         of the conversation, so the assistant turns cannot be located for the \
                         loss",
                        i + 1
                    ),
                });
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }
}

/// A parse or render error on one line: what went wrong (a `raise_exception` message as it was
/// raised), and the template line when minijinja knows it.
fn one_line_error(e: &minijinja::Error) -> String {
    let msg = match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    let msg = match e.line() {
        Some(line) => format!("{msg} (template line {line})"),
        None => msg,
    };
    crate::error::one_line(&msg)
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let err = |msg: String| Error::Data {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(err("is not a JSON object".into())),
        Err(e) => Err(err(format!(
            "is not JSON ({})",
            crate::error::first_line(&e.to_string())
        ))),
    }
}

/// `bos_token`, `eos_token`, ... of a tokenizer_config.json, as strings (an AddedToken object
/// gives its `content`).
fn special_tokens(
    config: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for key in SPECIAL_TOKEN_KEYS {
        let token = match config.get(*key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(obj) => obj
                .get("content")
                .and_then(|c| c.as_str())
                .map(String::from),
            None => None,
        };
        if let Some(token) = token {
            out.insert(key.to_string(), serde_json::Value::String(token));
        }
    }
    out
}

/// The special tokens (`bos_token`, `eos_token`, ...) of the tokenizer_config.json in `dir`, if
/// there is one (empty otherwise).
pub fn special_tokens_in(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let config = dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(serde_json::Map::new());
    }
    Ok(special_tokens(&read_json_object(&config)?))
}

/// The tokenizer_config.json beside a tokenizer argument (a tokenizer.json or its directory).
pub fn tokenizer_dir(tokenizer: &Path) -> PathBuf {
    if tokenizer.is_dir() {
        tokenizer.to_path_buf()
    } else {
        tokenizer
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Today's date (UTC) in a strftime format: %d %m %Y %y %b %B %a %A %H %M %S %j %%.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    strftime(secs, &format)
}

fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, keys in
/// their order (Python's separators: `", "` and `": "`, or newlines and `indent` spaces).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut buf = Vec::new();
    let result = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut buf, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut buf,
            PythonFormatter,
        )),
    };
    result.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(buf).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(text))
}

/// `json.dumps`' default separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        let mut special = serde_json::Map::new();
        special.insert("bos_token".into(), "<s>".into());
        ChatTemplate::new(src.to_string(), special, "test".into()).expect("parses")
    }

    fn msgs(v: serde_json::Value) -> Vec<Message> {
        v.as_array().expect("array").clone()
    }

    #[test]
    fn assistant_spans_cover_the_reply_and_its_end_marker() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</>\n\
             {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        );
        let m = msgs(serde_json::json!([
            {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "yes"},
        ]));
        let (text, spans) = t.render_with_assistant_spans(&m).expect("render");
        assert_eq!(
            text,
            "<s><user>hi</>\n<assistant>hello</>\n<user>again</>\n<assistant>yes</>\n"
        );
        let parts: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(parts, vec!["hello</>\n", "yes</>\n"]);
    }

    #[test]
    fn template_errors_and_non_prefix_templates_are_one_line() {
        let t = template("{{ raise_exception('only user and assistant roles') }}");
        let err = t.render(&[], false).expect_err("raises").to_string();
        assert!(err.contains("only user and assistant roles"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let bad = ChatTemplate::new("{% for %}".into(), Default::default(), "t.jinja".into())
            .err()
            .expect("does not parse")
            .to_string();
        assert!(
            bad.contains("t.jinja: the chat template does not parse"),
            "{bad}"
        );
        // The number of messages printed first: no turn is a prefix of the whole.
        let t =
            template("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}");
        let m = msgs(serde_json::json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ]));
        let err = t
            .render_with_assistant_spans(&m)
            .expect_err("not a prefix")
            .to_string();
        assert!(err.contains("cannot be located"), "{err}");
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let t = template("{{ x | tojson }}|{{ x | tojson(indent=2) }}");
        let x = serde_json::json!({"b": [1, 2.5, "é"], "a": {"q": null, "t": true}});
        let out = t
            .env
            .get_template("chat")
            .expect("template")
            .render(minijinja::context! { x => Value::from_serialize(&x) })
            .expect("render");
        let (flat, pretty) = out.split_once('|').expect("two parts");
        assert_eq!(flat, r#"{"a": {"q": null, "t": true}, "b": [1, 2.5, "é"]}"#);
        assert!(
            pretty.starts_with("{\n  \"a\": {\n    \"q\": null,"),
            "{pretty}"
        );
    }

    #[test]
    fn strftime_formats_dates_like_python() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let secs = 1_722_000_309;
        assert_eq!(strftime(secs, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(secs, "%A %B %j %H:%M:%S %y %%"),
            "Friday July 208 13:25:09 24 %"
        );
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
    }
}
