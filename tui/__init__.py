"""portscope's terminal UI (Textual). It reads the collector's state model
(tracer.state) and nothing else: no module here talks to the kernel."""
