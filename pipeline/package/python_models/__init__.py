"""Python-backend model.py templates that `package` copies into the repository as `1/model.py`.

They run inside tritonserver's Python-backend stub, where `triton_python_backend_utils`
exists; they import it only there, so the pipeline and the tests can import the rest.
"""
