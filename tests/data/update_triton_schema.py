"""Regenerate triton_model_config.txtpb: Triton's real ModelConfig schema, for tests/test_package.py.

Triton's model configuration schema is ``model_config.proto`` (github.com/triton-inference-server/common,
BSD-3-Clause, NVIDIA). The ``tritonclient`` wheel ships it compiled, as
``tritonclient/grpc/model_config_pb2.py``. This script writes that file's descriptor as protobuf text,
so the tests parse config.pbtxt against the upstream schema without depending on tritonclient (whose
grpc extra pins protobuf < 7 and whose base package pins ml-dtypes <= 0.5.4).

    pip download --no-deps tritonclient -d /tmp/tc && unzip -o -q /tmp/tc/tritonclient-*.whl -d /tmp/tc/x
    python tests/data/update_triton_schema.py /tmp/tc/x/tritonclient/grpc/model_config_pb2.py 2.73.0

(The module is loaded from its path: importing ``tritonclient.grpc`` would need grpcio.)
"""
import importlib.util
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2, text_format

HERE = Path(__file__).resolve().parent


def main(pb2_path: str, version: str) -> None:
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", pb2_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fdp = descriptor_pb2.FileDescriptorProto()
    mod.DESCRIPTOR.CopyToProto(fdp)
    header = (
        f"# Triton Inference Server's model_config.proto (package inference), as compiled into tritonclient {version}\n"
        "# (tritonclient/grpc/model_config_pb2.py), written as a protobuf-text FileDescriptorProto.\n"
        "# Source: github.com/triton-inference-server/common, protobuf/model_config.proto.\n"
        "# Copyright NVIDIA CORPORATION & AFFILIATES, BSD-3-Clause. Regenerate: tests/data/update_triton_schema.py\n"
    )
    (HERE / "triton_model_config.txtpb").write_text(header + text_format.MessageToString(fdp))


if __name__ == "__main__":
    main(*sys.argv[1:3])
