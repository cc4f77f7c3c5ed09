"""JSON schemas as clients send them (pydantic, zod, hand-written), for the structured-output tests."""

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}

# What clients send (pydantic, zod, hand-written): each keyword of the issue at least once, every
# string, number and array bounded so a random model's answer ends.
SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "kind": {"const": "paint"}},
     "required": ["color", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {"nick": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]}},
     "required": ["nick"], "additionalProperties": False},
    {"$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                           "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/Point"},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {
        "flag": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["flag", "tags"], "additionalProperties": False}}, "required": ["inner"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "title": "Answer", "description": "an answer", "properties": {
        "ok": {"type": "boolean", "description": "whether", "default": True},
        "score": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"type": "null"}]}},
     "required": ["ok", "score"], "additionalProperties": False},
]
