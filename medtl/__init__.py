"""medtl: medical-imaging transfer learning from DICOM to a cross-hospital validation report."""

__version__ = "0.1.0"

import logging as _logging
import warnings as _warnings

# MONAI announces at import that NVIDIA's optional GPU JPEG decoder is absent; pydicom's decoders are used instead.
_warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
