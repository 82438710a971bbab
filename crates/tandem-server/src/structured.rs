//! Structured outputs over the API: OpenAI's `response_format` and vLLM's `guided_*` and
//! `structured_outputs` fields, read into one grammar the sampler holds every choice to.
use crate::api::{Common, StructuredOutputs};
use crate::error::ApiError;
use crate::AppState;
use serde_json::Value;
use tandem_runtime::{Grammar, GrammarSpec};

/// The grammar a request asks for, with the field that asked; at most one field may.
pub(crate) fn requested(c: &Common) -> Result<Option<(GrammarSpec, &'static str)>, ApiError> {
    let mut asked: Vec<(GrammarSpec, &'static str)> = Vec::new();
    if let Some(rf) = &c.response_format {
        let param = "response_format";
        match rf.kind.as_str() {
            "text" => {}
            "json_object" => asked.push((GrammarSpec::JsonObject, param)),
            "json_schema" => {
                let schema = rf.json_schema.as_ref().and_then(|j| j.schema.clone()).ok_or_else(|| {
                    ApiError::bad_request(
                        "`response_format.json_schema.schema` is required for `json_schema`",
                        Some(param),
                    )
                })?;
                asked.push((GrammarSpec::JsonSchema(schema_object(schema, param)?), param));
            }
            other => {
                return Err(ApiError::bad_request(
                    format!("`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"),
                    Some(param),
                ))
            }
        }
    }
    if let Some(schema) = &c.guided_json {
        asked.push((GrammarSpec::JsonSchema(schema_object(schema.clone(), "guided_json")?), "guided_json"));
    }
    if let Some(rx) = &c.guided_regex {
        asked.push((GrammarSpec::Regex(rx.clone()), "guided_regex"));
    }
    if let Some(options) = &c.guided_choice {
        asked.push((GrammarSpec::Choice(options.clone()), "guided_choice"));
    }
    if let Some(lark) = &c.guided_grammar {
        asked.push((GrammarSpec::Lark(lark.clone()), "guided_grammar"));
    }
    if let Some(s) = &c.structured_outputs {
        asked.extend(from_structured_outputs(s)?);
    }
    if asked.len() > 1 {
        let names: Vec<&str> = asked.iter().map(|a| a.1).collect();
        return Err(ApiError::bad_request(
            format!("ask for one structured output at a time, got {}", names.join(", ")),
            Some(asked[1].1),
        ));
    }
    Ok(asked.pop())
}

/// vLLM's `structured_outputs` object: exactly one of its kinds.
fn from_structured_outputs(s: &StructuredOutputs) -> Result<Vec<(GrammarSpec, &'static str)>, ApiError> {
    let param = "structured_outputs";
    let mut asked = Vec::new();
    if let Some(schema) = &s.json {
        asked.push((GrammarSpec::JsonSchema(schema_object(schema.clone(), param)?), param));
    }
    if let Some(rx) = &s.regex {
        asked.push((GrammarSpec::Regex(rx.clone()), param));
    }
    if let Some(options) = &s.choice {
        asked.push((GrammarSpec::Choice(options.clone()), param));
    }
    if let Some(lark) = &s.grammar {
        asked.push((GrammarSpec::Lark(lark.clone()), param));
    }
    if s.json_object == Some(true) {
        asked.push((GrammarSpec::JsonObject, param));
    }
    if asked.len() != 1 {
        return Err(ApiError::bad_request(
            "`structured_outputs` takes exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`",
            Some(param),
        ));
    }
    Ok(asked)
}

/// A JSON schema given as an object (or `true`), or as a string that holds one (vLLM accepts both).
fn schema_object(schema: Value, param: &'static str) -> Result<Value, ApiError> {
    let schema = match schema {
        Value::String(s) => serde_json::from_str(&s)
            .map_err(|e| ApiError::bad_request(format!("`{param}` is not a JSON schema: {e}"), Some(param)))?,
        v => v,
    };
    match schema {
        Value::Object(_) | Value::Bool(true) => Ok(schema),
        _ => Err(ApiError::bad_request(format!("`{param}` must be a JSON schema object"), Some(param))),
    }
}

/// The request's grammar compiled for `state`'s model, if it asks for one (a grammar that does not
/// compile is a 400 naming the field).
pub(crate) fn grammar(state: &AppState, c: &Common) -> Result<Option<Grammar>, ApiError> {
    let Some((spec, param)) = requested(c)? else { return Ok(None) };
    let grammars = state.grammars().map_err(|e| {
        ApiError::bad_request(format!("this model's tokenizer cannot drive structured outputs: {e}"), Some(param))
    })?;
    grammars.compile(&spec).map(Some).map_err(|e| ApiError::bad_request(format!("`{param}`: {e}"), Some(param)))
}
