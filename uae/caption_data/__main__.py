from uae.apps.caption_data import main

raise SystemExit(main())
