from lxmert_bench.cli import main

raise SystemExit(main())
