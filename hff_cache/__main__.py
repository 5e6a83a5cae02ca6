from hff_cache.cli import main

main()
