//! Strict BARE codec for the runner protocol: a serde serializer and a borrowed-slice serde
//! deserializer, plus the typed entry points (`decode_to_server`, `encode_to_client`, ...).
//!
//! Decoding accepts exactly what the TS decoder of `@rivetkit/engine-runner-protocol@2.2.1`
//! accepts: canonical uvarints only, bools and optional flags 0/1 only, valid UTF-8, known
//! union tags, unique map keys, and no trailing bytes. It must never panic and never allocate
//! in proportion to a length prefix that the remaining input cannot satisfy.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

use super::types::{ToClient, ToServer, DUPLICATE_KEY_PREFIX};

/// Why a message could not be decoded (or, for `Message`, encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unexpected end of message at byte {offset}")]
    UnexpectedEof { offset: usize },
    #[error("{remaining} trailing bytes after the message at byte {offset}")]
    TrailingBytes { offset: usize, remaining: usize },
    #[error("invalid union tag {tag} at byte {offset}")]
    InvalidTag { offset: usize, tag: u64 },
    #[error("invalid UTF-8 string at byte {offset}")]
    InvalidUtf8 { offset: usize },
    #[error("duplicated map key at byte {offset}")]
    DuplicateKey { offset: usize },
    #[error("invalid bool/optional flag {value} at byte {offset} (must be 0 or 1)")]
    InvalidBool { offset: usize, value: u8 },
    #[error("non-canonical or oversized variable-length integer at byte {offset}")]
    InvalidUint { offset: usize },
    #[error("length {len} at byte {offset} exceeds the remaining input")]
    LengthOutOfBounds { offset: usize, len: u64 },
    #[error("message of {len} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")]
    MessageTooLarge { len: usize },
    #[error("{0}")]
    Message(String),
}

/// Largest message the TS codec handles: its `ByteCursor` refuses buffers above 32 MiB, both
/// when decoding and when encoding. torpor's decoders refuse them as well, and senders must
/// keep every message at or below this size (a runner cannot decode anything larger).
pub const MAX_MESSAGE_LEN: usize = 32 * 1024 * 1024;

impl de::Error for ProtocolError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ProtocolError::Message(msg.to_string())
    }
}

impl ser::Error for ProtocolError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ProtocolError::Message(msg.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Typed entry points
// ---------------------------------------------------------------------------------------------

/// Decode one runner→gateway message (strict).
pub fn decode_to_server(buf: &[u8]) -> Result<ToServer, ProtocolError> {
    from_slice(buf)
}

/// Decode one gateway→runner message (strict).
pub fn decode_to_client(buf: &[u8]) -> Result<ToClient, ProtocolError> {
    from_slice(buf)
}

/// Encode one gateway→runner message. Keep it within [`MAX_MESSAGE_LEN`].
pub fn encode_to_client(msg: &ToClient) -> Vec<u8> {
    encode_infallible(msg)
}

/// Encode one runner→gateway message.
pub fn encode_to_server(msg: &ToServer) -> Vec<u8> {
    encode_infallible(msg)
}

fn encode_infallible<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // The protocol types only use serializer calls this serializer supports and never call
    // `ser::Error::custom`, so serialization cannot fail; the fallback keeps this panic-free.
    if to_writer(&mut out, msg).is_err() {
        out.clear();
    }
    out
}

/// Decode any value strictly from `buf`; the whole buffer must be consumed.
pub fn from_slice<'de, T: de::Deserialize<'de>>(buf: &'de [u8]) -> Result<T, ProtocolError> {
    if buf.len() > MAX_MESSAGE_LEN {
        return Err(ProtocolError::MessageTooLarge { len: buf.len() });
    }
    let mut d = BareDeserializer::new(buf);
    let v = T::deserialize(&mut d)?;
    d.finish()?;
    Ok(v)
}

/// Encode any serde value as BARE into a new buffer.
pub fn to_vec<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    to_writer(&mut out, v)?;
    Ok(out)
}

/// Encode any serde value as BARE, appending to `out`.
pub fn to_writer<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), ProtocolError> {
    v.serialize(&mut BareSerializer { out })
}

// ---------------------------------------------------------------------------------------------
// uvarint helpers (shared with the hot path)
// ---------------------------------------------------------------------------------------------

/// Append `v` as a BARE uvarint.
#[inline]
pub(crate) fn write_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Read a canonical BARE uvarint at `*pos`. On success advances `*pos`.
#[inline]
pub(crate) fn read_uvarint(buf: &[u8], pos: &mut usize) -> Result<u64, ProtocolError> {
    let start = *pos;
    let mut result: u64 = 0;
    let mut shift = 0u32;
    let mut i = start;
    loop {
        let Some(&b) = buf.get(i) else {
            return Err(ProtocolError::UnexpectedEof { offset: i });
        };
        i += 1;
        let n = i - start;
        if n == 10 && b > 1 {
            return Err(ProtocolError::InvalidUint { offset: start });
        }
        result |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            if n > 1 && b == 0 {
                return Err(ProtocolError::InvalidUint { offset: start });
            }
            *pos = i;
            return Ok(result);
        }
        shift += 7;
    }
}

// ---------------------------------------------------------------------------------------------
// Deserializer
// ---------------------------------------------------------------------------------------------

/// Strict BARE deserializer over a borrowed slice.
pub struct BareDeserializer<'de> {
    buf: &'de [u8],
    pos: usize,
}

impl<'de> BareDeserializer<'de> {
    pub fn new(buf: &'de [u8]) -> Self {
        BareDeserializer { buf, pos: 0 }
    }

    /// Fail unless every byte was consumed.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.pos < self.buf.len() {
            return Err(ProtocolError::TrailingBytes {
                offset: self.pos,
                remaining: self.buf.len() - self.pos,
            });
        }
        Ok(())
    }

    #[inline]
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'de [u8], ProtocolError> {
        if n > self.remaining() {
            return Err(ProtocolError::UnexpectedEof {
                offset: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    #[inline]
    fn uvarint(&mut self) -> Result<u64, ProtocolError> {
        read_uvarint(self.buf, &mut self.pos)
    }

    /// A length/count prefix; refused before any allocation when it exceeds the remaining
    /// input (every element of every list/map in the schema takes at least one byte).
    #[inline]
    fn length(&mut self) -> Result<usize, ProtocolError> {
        let offset = self.pos;
        let len = self.uvarint()?;
        if len > self.remaining() as u64 {
            return Err(ProtocolError::LengthOutOfBounds { offset, len });
        }
        Ok(len as usize)
    }

    #[inline]
    fn flag(&mut self) -> Result<bool, ProtocolError> {
        let offset = self.pos;
        let [b] = self.take_array::<1>()?;
        match b {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ProtocolError::InvalidBool { offset, value }),
        }
    }

    #[inline]
    fn str_bytes(&mut self) -> Result<(usize, &'de str), ProtocolError> {
        let len = self.length()?;
        let offset = self.pos;
        let bytes = self.take(len)?;
        match simdutf8::basic::from_utf8(bytes) {
            Ok(s) => Ok((offset, s)),
            Err(_) => Err(ProtocolError::InvalidUtf8 { offset }),
        }
    }

    fn unsupported(&self, what: &str) -> ProtocolError {
        ProtocolError::Message(format!("BARE decoding of {what} is not supported"))
    }
}

macro_rules! fixed_int {
    ($method:ident, $visit:ident, $ty:ty, $n:expr) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
            let a = self.take_array::<$n>()?;
            visitor.$visit(<$ty>::from_le_bytes(a))
        }
    };
}

impl<'de> de::Deserializer<'de> for &mut BareDeserializer<'de> {
    type Error = ProtocolError;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, ProtocolError> {
        Err(self.unsupported("self-describing values"))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        let b = self.flag()?;
        visitor.visit_bool(b)
    }

    fixed_int!(deserialize_i8, visit_i8, i8, 1);
    fixed_int!(deserialize_i16, visit_i16, i16, 2);
    fixed_int!(deserialize_i32, visit_i32, i32, 4);
    fixed_int!(deserialize_i64, visit_i64, i64, 8);
    fixed_int!(deserialize_u8, visit_u8, u8, 1);
    fixed_int!(deserialize_u16, visit_u16, u16, 2);
    fixed_int!(deserialize_u32, visit_u32, u32, 4);
    fixed_int!(deserialize_u64, visit_u64, u64, 8);
    fixed_int!(deserialize_f32, visit_f32, f32, 4);
    fixed_int!(deserialize_f64, visit_f64, f64, 8);

    fn deserialize_char<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, ProtocolError> {
        Err(self.unsupported("char"))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        let (_, s) = self.str_bytes()?;
        visitor.visit_borrowed_str(s)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        let len = self.length()?;
        let bytes = self.take(len)?;
        visitor.visit_borrowed_bytes(bytes)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        if self.flag()? {
            visitor.visit_some(self)
        } else {
            visitor.visit_none()
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        let len = self.length()?;
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_seq(Counted {
            de: self,
            left: len,
        })
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProtocolError> {
        let len = self.length()?;
        let r = visitor.visit_map(Counted {
            de: &mut *self,
            left: len,
        });
        // Attribute duplicate-key errors raised by the map visitors to a precise error kind.
        r.map_err(|e| match e {
            ProtocolError::Message(m) if m.starts_with(DUPLICATE_KEY_PREFIX) => {
                ProtocolError::DuplicateKey { offset: self.pos }
            }
            other => other,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_seq(Counted {
            de: self,
            left: fields.len(),
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        let offset = self.pos;
        // Union tags are uvarints; no union here has 128 members, so a valid tag is always a
        // single byte < 0x80. The TS decoder reads a u8 and rejects every other value as an
        // unknown tag; do the same.
        let [b] = self.take_array::<1>()?;
        let tag = u64::from(b);
        if tag >= variants.len() as u64 {
            return Err(ProtocolError::InvalidTag { offset, tag });
        }
        visitor.visit_enum(Enum {
            de: self,
            tag: tag as u32,
        })
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, ProtocolError> {
        Err(self.unsupported("identifiers"))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, ProtocolError> {
        Err(self.unsupported("ignored values"))
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

struct Counted<'a, 'de> {
    de: &'a mut BareDeserializer<'de>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Counted<'_, 'de> {
    type Error = ProtocolError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ProtocolError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> de::MapAccess<'de> for Counted<'_, 'de> {
    type Error = ProtocolError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProtocolError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.de).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProtocolError> {
        seed.deserialize(&mut *self.de)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

struct Enum<'a, 'de> {
    de: &'a mut BareDeserializer<'de>,
    tag: u32,
}

impl<'de> de::EnumAccess<'de> for Enum<'_, 'de> {
    type Error = ProtocolError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self), ProtocolError> {
        let d: de::value::U32Deserializer<ProtocolError> = self.tag.into_deserializer();
        let v = seed.deserialize(d)?;
        Ok((v, self))
    }
}

impl<'de> de::VariantAccess<'de> for Enum<'_, 'de> {
    type Error = ProtocolError;

    fn unit_variant(self) -> Result<(), ProtocolError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, ProtocolError> {
        seed.deserialize(self.de)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_seq(Counted {
            de: self.de,
            left: len,
        })
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProtocolError> {
        visitor.visit_seq(Counted {
            de: self.de,
            left: fields.len(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Serializer
// ---------------------------------------------------------------------------------------------

/// BARE serializer appending to a `Vec<u8>`.
pub struct BareSerializer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> BareSerializer<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        BareSerializer { out }
    }
}

fn length_required() -> ProtocolError {
    ProtocolError::Message("BARE sequences and maps need a known length".into())
}

impl<'a, 'b> ser::Serializer for &'b mut BareSerializer<'a> {
    type Ok = ();
    type Error = ProtocolError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> Result<(), ProtocolError> {
        self.out.push(v as u8);
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), ProtocolError> {
        self.out.push(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), ProtocolError> {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), ProtocolError> {
        self.serialize_u32(v as u32)
    }
    fn serialize_str(self, v: &str) -> Result<(), ProtocolError> {
        self.serialize_bytes(v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), ProtocolError> {
        write_uvarint(self.out, v.len() as u64);
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), ProtocolError> {
        self.out.push(0);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), ProtocolError> {
        self.out.push(1);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), ProtocolError> {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), ProtocolError> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
    ) -> Result<(), ProtocolError> {
        write_uvarint(self.out, u64::from(variant_index));
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), ProtocolError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
        value: &T,
    ) -> Result<(), ProtocolError> {
        write_uvarint(self.out, u64::from(variant_index));
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, ProtocolError> {
        let len = len.ok_or_else(length_required)?;
        write_uvarint(self.out, len as u64);
        Ok(self)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self, ProtocolError> {
        Ok(self)
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self, ProtocolError> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, ProtocolError> {
        write_uvarint(self.out, u64::from(variant_index));
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, ProtocolError> {
        let len = len.ok_or_else(length_required)?;
        write_uvarint(self.out, len as u64);
        Ok(self)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, ProtocolError> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        variant_index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, ProtocolError> {
        write_uvarint(self.out, u64::from(variant_index));
        Ok(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl ser::SerializeSeq for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

impl ser::SerializeMap for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), ProtocolError> {
        k.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        v: &T,
    ) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut BareSerializer<'_> {
    type Ok = ();
    type Error = ProtocolError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        v: &T,
    ) -> Result<(), ProtocolError> {
        v.serialize(&mut **self)
    }
    fn end(self) -> Result<(), ProtocolError> {
        Ok(())
    }
}

#[cfg(test)]
mod smoke_tests {
    use super::*;
    use crate::protocol::types::*;

    #[test]
    fn smoke_round_trip() {
        let m = ToServer::TunnelMessage(ToServerTunnelMessage {
            message_id: MessageId {
                gateway_id: [1, 2, 3, 4],
                request_id: [5, 6, 7, 8],
                message_index: 0x0102,
            },
            message_kind: ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
                status: 200,
                headers: StrMap(vec![("a".into(), "b".into())]),
                body: Some(vec![9]),
                stream: true,
            }),
        });
        let b = encode_to_server(&m);
        assert_eq!(
            b,
            [6, 1, 2, 3, 4, 5, 6, 7, 8, 2, 1, 0, 200, 0, 1, 1, b'a', 1, b'b', 1, 1, 9, 1]
        );
        assert_eq!(decode_to_server(&b).unwrap(), m);
        assert_eq!(serde_bare::to_vec(&m).unwrap(), b);
    }
}
