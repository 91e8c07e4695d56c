"""Shared DIMSE pieces: errors, statuses, presentation contexts."""

from __future__ import annotations

from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import sop_class as sc

UNCOMPRESSED: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# What the storage SCP accepts: uncompressed first, then every encapsulated syntax the installed
# decoders read (storage/pixels.py), received as-is (never transcoded here).
STORAGE_TRANSFER_SYNTAXES = [
    *UNCOMPRESSED,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

# Storage SOP classes proposed with SCP role on a C-GET association (a requestor may propose at
# most 128 contexts, so not all ~170): what a research cohort is made of.
GET_STORAGE_CLASSES = [
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedMRImageStorage,
    sc.MRSpectroscopyStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.NuclearMedicineImageStorage,
    sc.ComputedRadiographyImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.DigitalXRayImageStorageForProcessing,
    sc.DigitalMammographyXRayImageStorageForPresentation,
    sc.BreastTomosynthesisImageStorage,
    sc.UltrasoundImageStorage,
    sc.UltrasoundMultiFrameImageStorage,
    sc.XRayAngiographicImageStorage,
    sc.EnhancedXAImageStorage,
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.Comprehensive3DSRStorage,
    sc.XRayRadiationDoseSRStorage,
    sc.KeyObjectSelectionDocumentStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.ColorSoftcopyPresentationStateStorage,
    sc.SegmentationStorage,
    sc.ParametricMapStorage,
    sc.SpatialRegistrationStorage,
    sc.RawDataStorage,
    sc.EncapsulatedPDFStorage,
    sc.RTImageStorage,
    sc.RTDoseStorage,
    sc.RTStructureSetStorage,
    sc.RTPlanStorage,
]

# Classes of the list above without pixel data: a C-GET offers them uncompressed only.
NO_PIXELS = {
    sc.MRSpectroscopyStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.Comprehensive3DSRStorage,
    sc.XRayRadiationDoseSRStorage,
    sc.KeyObjectSelectionDocumentStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.ColorSoftcopyPresentationStateStorage,
    sc.SpatialRegistrationStorage,
    sc.RawDataStorage,
    sc.EncapsulatedPDFStorage,
    sc.RTStructureSetStorage,
    sc.RTPlanStorage,
}
# What a C-GET offers compressed when the PACS does not say which classes a study holds.
OFTEN_COMPRESSED = [
    sc.CTImageStorage,
    sc.MRImageStorage,
    sc.EnhancedCTImageStorage,
    sc.EnhancedMRImageStorage,
    sc.DigitalXRayImageStorageForPresentation,
    sc.UltrasoundMultiFrameImageStorage,
]


class DimseError(Exception):
    """A DIMSE operation failed. Messages carry AE titles, statuses and counts, never PHI."""

    reason = "dimse failure"

    # result: the partial SubOperations of an interrupted C-MOVE / C-GET (defined in scu,
    # which imports this module: Any here keeps the imports one way)
    def __init__(self, message: str, *, status: int | None = None, result: Any = None):
        super().__init__(message)
        self.status = status
        self.result = result


class AssociationRejected(DimseError):
    """The peer rejected the association (unknown calling AE, no common context, busy...)."""

    reason = "association rejected"


class AssociationAborted(DimseError):
    """The association was aborted, or the peer dropped the connection, mid-operation."""

    reason = "association aborted"


class PeerUnreachable(DimseError):
    """No TCP connection to the peer (down, wrong host/port, firewall)."""

    reason = "peer unreachable"


class DimseTimeout(DimseError):
    """No answer within the timeout (connection, association negotiation or DIMSE response)."""

    reason = "timeout"
