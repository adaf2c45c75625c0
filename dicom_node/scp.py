"""The DICOM Storage SCP in front of a :class:`~dicom_node.node.Node` (pynetdicom).

What it negotiates: Verification (C-ECHO) and the image storage SOP classes of :data:`IMAGE_STORAGE` in the
transfer syntaxes of :data:`TRANSFER_SYNTAXES` (those pydicom decodes with what the project installs; any other
presentation context is rejected, abstract or transfer syntax not supported). With ``allowed_aets`` only those
calling AE titles may associate (others: rejected permanent, calling AE title not recognised). While the spool is
full the node rejects associations (rejected transient, local limit exceeded), and a C-STORE that would overfill
it gets 0xA700 (out of resources): senders retry later. A corrupt instance gets 0xC000 (cannot understand) and a
log line; the rest of its series is taken as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom import uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.node import Node, Refused

__all__ = ["IMAGE_STORAGE", "MAX_PDU", "TRANSFER_SYNTAXES", "make_ae", "serve"]

log = logging.getLogger(__name__)

IMAGE_STORAGE = (
    uid.CTImageStorage, uid.EnhancedCTImageStorage, uid.LegacyConvertedEnhancedCTImageStorage,
    uid.MRImageStorage, uid.EnhancedMRImageStorage, uid.LegacyConvertedEnhancedMRImageStorage,
    uid.ComputedRadiographyImageStorage, uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing, uid.SecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage, uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)
# Native encodings, deflate, and the compressed syntaxes pydicom decodes itself (RLE) or through Pillow (a core
# dependency): JPEG baseline and lossless JPEG 2000. JPEG-LS and lossless JPEG need decoders not installed.
TRANSFER_SYNTAXES = (
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian, uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEG2000Lossless,
)
# A-ASSOCIATE-RJ: rejected transient, DUL service provider (presentation related), local limit exceeded.
_SPOOL_FULL = (0x02, 0x03, 0x02)
# The largest PDU the node receives, announced at association: a sender splits each instance into PDUs of at
# most this size. pynetdicom's default (16 KiB) made receiving 512² CT slices 3x slower than 1 MiB does.
MAX_PDU = 1 << 20


def _origin(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def make_ae(node: Node, aet: str, allowed_aets: Sequence[str] = ()) -> tuple[AE, list]:
    """The application entity and its event handlers (for ``AE.start_server``)."""
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = MAX_PDU
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_STORAGE:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    if allowed_aets:
        ae.require_calling_aet = list(allowed_aets)
    # A series arrives in one association per sender; several senders at once are normal.
    ae.maximum_associations = 16

    def on_requested(event: evt.Event) -> None:
        if node.spool.full(1):  # not one more byte fits
            log.warning("refusing an association from %s: the spool is full", event.assoc.requestor.address)
            event.assoc.acse.send_reject(*_SPOOL_FULL)
            # As pynetdicom does for its own rejections: wait until the reject is on the wire and the peer gone.
            event.assoc.kill()

    def on_store(event: evt.Event) -> int:
        try:
            node.receive(event.encoded_dataset(), _origin(event))
        except Refused as exc:
            log.error("C-STORE refused with status 0x%04X: %s", exc.status, exc)
            return exc.status
        return 0x0000

    return ae, [(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, on_store)]


def serve(node: Node, aet: str, host: str, port: int, allowed_aets: Sequence[str] = ()):
    """Start the SCP without blocking; returns the server (``server.shutdown()`` stops it)."""
    ae, handlers = make_ae(node, aet, allowed_aets)
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    log.info("DICOM node %s listening on %s:%d (spool %s)", aet, host, port, node.spool.root)
    return server
