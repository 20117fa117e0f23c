"""medtl: medical-imaging transfer learning from DICOM to a cross-hospital validation report."""

__version__ = "0.1.0"
