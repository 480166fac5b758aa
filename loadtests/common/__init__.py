"""What the benchmarks, load tests and tests share: tiny models and adapters built offline (``factories``), a real
server process (``server_process``), PEFT as the reference (``peft_reference``), whole-batch forward passes with one
adapter slot per row (``lora_rows``), contenders timed side by side (``timing``) and generated sections of the docs
(``docs_section``)."""
