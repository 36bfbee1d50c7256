"""ISO 8583 wire layer (docs/contract.md, wire profile): framing, codec, field helpers, typed requests.

`framing` turns a byte stream into frames, `codec` turns a frame into a doc (dict of fields) and
back, `request` turns a doc into a validated AuthRequest / NetworkRequest and builds responses,
`fields` and `currency` are the pure helpers they share. Only `framing` does I/O.
"""

from authsrv.iso.codec import SPEC as SPEC
from authsrv.iso.codec import IsoDecodeError as IsoDecodeError
from authsrv.iso.codec import IsoEncodeError as IsoEncodeError
from authsrv.iso.codec import decode as decode
from authsrv.iso.codec import encode as encode
from authsrv.iso.fields import FieldError as FieldError
from authsrv.iso.fields import OriginalData as OriginalData
from authsrv.iso.fields import Track2 as Track2
from authsrv.iso.framing import FRAME_SIZE_MAX as FRAME_SIZE_MAX
from authsrv.iso.framing import FramingError as FramingError
from authsrv.iso.framing import frame as frame
from authsrv.iso.framing import frame_many as frame_many
from authsrv.iso.framing import read_frames as read_frames
from authsrv.iso.request import MESSAGE_CLASSES as MESSAGE_CLASSES
from authsrv.iso.request import AuthRequest as AuthRequest
from authsrv.iso.request import FormatError as FormatError
from authsrv.iso.request import Mti as Mti
from authsrv.iso.request import NetworkCode as NetworkCode
from authsrv.iso.request import NetworkRequest as NetworkRequest
from authsrv.iso.request import UnsupportedMti as UnsupportedMti
from authsrv.iso.request import parse_mti as parse_mti
from authsrv.iso.request import parse_request as parse_request
from authsrv.iso.request import response_doc as response_doc
from authsrv.iso.request import response_mti as response_mti
